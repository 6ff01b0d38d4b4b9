"""AnyUp's objective: its three terms (reconstruction on drawn crop windows, augmentation consistency of the
guide, downsampling consistency) on known answers, the guide augmentation, per-image draws that a resumed
run repeats, and training through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from objective_toys import GuidedToy, random_batch
from safetensors.torch import load_file
from train_helpers import TINY_NAME, one_thread, save_tiny_weights, train_args, write_image_tree

from featlift import create_backbone
from featlift.cli import main
from featlift.train.data import scan_images
from featlift.train.objectives.anyup import (
    AUGMENTATION_WEIGHT,
    CROPS,
    DOWNSAMPLING_WEIGHT,
    VIEWS,
    AnyUpObjective,
    crop_view_name,
    crop_window,
    downsampling_loss,
    tiled_quadrants,
)
from featlift.train.objectives.anyup_augmentation import anyup_augment
from featlift.train.objectives.reconstruction import (
    reconstruction_loss,
    reconstruction_terms,
)
from featlift.train.views import load_views

CHANNELS = 8


def anyup_batch(count: int = 3, seed: int = 0, size: int = 64, patch: int = 4):
    """Views of an image of `size` px: ``low`` at size/2 and the nine size/2 crops (grids size/2/patch)."""
    half = size // 2
    shapes = {
        "low": (count, half, half, patch),
        **{crop_view_name(i, j): (count, half, half, patch) for i, j in CROPS},
    }
    return random_batch(shapes, CHANNELS, seed)


def test_downsampling_term_is_zero_exactly_for_a_prediction_whose_2x2_averages_are_the_input():
    torch.manual_seed(0)
    features = torch.randn(2, CHANNELS, 3, 5)
    blocks = features.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)  # each token copied 2x2
    assert float(downsampling_loss(blocks, features)) == 0.0
    wiggle = torch.tensor([[1.0, -1.0], [-1.0, 1.0]]).repeat(3, 5) * 0.7  # zero mean in every 2x2 block
    assert float(downsampling_loss(blocks + wiggle, features)) < 1e-6
    shifted = (features + 0.5).repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)
    expected = sum(reconstruction_terms(features + 0.5, features)).mean()
    assert torch.allclose(downsampling_loss(shifted, features), expected, atol=1e-7) and expected > 0.01
    bilinear = F.interpolate(features, scale_factor=2, mode="bilinear")  # bilinear does not average back
    assert float(downsampling_loss(bilinear, features)) > 0.01
    threefold = torch.randn(2, CHANNELS, 9, 15)  # at any ratio the prediction is block-averaged ("area")
    expected = reconstruction_loss(F.avg_pool2d(threefold, 3), features)
    assert torch.allclose(downsampling_loss(threefold, features), expected, atol=1e-6)


def test_crop_windows_and_quadrants_tile_the_image_grid():
    grid = torch.arange(2 * 8 * 8, dtype=torch.float32).view(2, 1, 8, 8)
    assert torch.equal(crop_window(grid, 0, 0), grid[..., :4, :4])
    assert torch.equal(crop_window(grid, 1, 2), grid[..., 2:6, 4:8])
    assert torch.equal(crop_window(grid, 2, 1), grid[..., 4:8, 2:6])
    batch = anyup_batch(count=2, size=64, patch=4)  # low and crops 8x8 tokens; the image grid 16x16
    whole = torch.randn(2, CHANNELS, 16, 16)
    for i, j in CROPS:
        batch.features[crop_view_name(i, j)] = crop_window(whole, i, j).clone()
    assert torch.equal(tiled_quadrants(batch), whole)
    with pytest.raises(Exception, match="grid 6x6 tokens is not a multiple of 4"):
        crop_window(torch.zeros(1, 1, 6, 6), 1, 1)


class Recorder(GuidedToy):
    """The toy, recording the output size of every call."""

    def __init__(self, channels):
        super().__init__(channels)
        self.sizes = []

    def forward(self, features, guide, output_size):
        self.sizes.append((tuple(features.shape[-2:]), tuple(guide.shape[-2:]), tuple(output_size)))
        return super().forward(features, guide, output_size)


def test_the_three_terms_compare_what_anyup_compares_with_its_weights():
    objective, toy, batch = AnyUpObjective(), Recorder(CHANNELS), anyup_batch(seed=1)
    with torch.no_grad():
        toy.guide_mix.weight.normal_()
        toy.gain.normal_()
    torch.manual_seed(3)
    terms = objective.loss_terms(toy, batch)
    # the prediction at the image's grid, the augmented and the clean guide at the guide's pixel size
    assert toy.sizes == [
        ((8, 8), (32, 32), (16, 16)),
        ((8, 8), (32, 32), (32, 32)),
        ((8, 8), (32, 32), (32, 32)),
    ]
    low, guide = batch.features["low"], batch.guide("low")
    prediction = toy(low, guide, (16, 16))
    crops = objective.drawn_crops(toy, batch)
    assert all(len(c) == 4 for c in crops)
    windows = torch.stack([crop_window(prediction[k], i, j) for k, c in enumerate(crops) for i, j in c])
    targets = torch.stack(
        [batch.features[crop_view_name(i, j)][k] for k, c in enumerate(crops) for i, j in c]
    )
    assert torch.allclose(terms["reconstruction"], reconstruction_loss(windows, targets), atol=1e-6)
    augmented = toy(low, objective.augmented_guide(toy, batch), (32, 32))
    clean = toy(low, guide, (32, 32))
    assert torch.allclose(terms["augmentation"], reconstruction_loss(augmented, clean), atol=1e-6)
    assert terms["augmentation"] > 0
    assert torch.allclose(terms["downsampling"], downsampling_loss(prediction, low), atol=1e-6)
    total = (
        terms["reconstruction"]
        + AUGMENTATION_WEIGHT * terms["augmentation"]
        + DOWNSAMPLING_WEIGHT * terms["downsampling"]
    )
    assert torch.allclose(objective.loss(toy, batch), total, atol=1e-6)
    assert AUGMENTATION_WEIGHT == DOWNSAMPLING_WEIGHT == 0.1  # config/base.yaml

    # the clean output is a stop-gradient target: only the augmented branch carries gradient to the guide conv
    terms["augmentation"].backward()
    reference = reconstruction_loss(toy(low, objective.augmented_guide(toy, batch), (32, 32)), clean.detach())
    grad = toy.guide_mix.weight.grad.clone()
    toy.zero_grad()
    reference.backward()
    assert torch.allclose(grad, toy.guide_mix.weight.grad, atol=1e-6)

    # a guide-blind upsampler is perfectly consistent under augmentation
    with torch.no_grad():
        toy.guide_mix.weight.zero_()
    assert float(objective.loss_terms(toy, batch)["augmentation"].detach()) < 1e-10


def test_crops_and_augmentations_are_drawn_per_seed_epoch_and_image():
    objective, toy, batch = AnyUpObjective(), GuidedToy(CHANNELS), anyup_batch(count=4, seed=2)
    batch.seed, batch.epoch = 1, 0
    first, guide = objective.drawn_crops(toy, batch), objective.augmented_guide(toy, batch)
    assert first == objective.drawn_crops(toy, batch) and torch.equal(
        guide, objective.augmented_guide(toy, batch)
    )
    seen = set()
    for epoch in range(1, 12):
        batch.epoch = epoch
        crops = objective.drawn_crops(toy, batch)
        assert crops != first
        seen.update(c for image in crops for c in image)
    assert seen == set(CROPS)
    assert not torch.equal(objective.augmented_guide(toy, batch), guide)


def test_the_guide_augmentation_is_anyups_photometric_list():
    torch.manual_seed(0)
    image = (torch.rand(3, 32, 32) * 255).to(torch.uint8)
    outputs = [anyup_augment(image, torch.Generator().manual_seed(s)) for s in range(200)]
    assert torch.equal(outputs[0], anyup_augment(image, torch.Generator().manual_seed(0)))
    assert all(
        o.shape == (3, 32, 32) and o.dtype == torch.float32 and 0 <= o.min() and o.max() <= 1 for o in outputs
    )
    grey = sum(bool((o[0] == o[1]).all() and (o[1] == o[2]).all()) for o in outputs)
    assert 8 <= grey <= 40, grey  # p 0.1 of greyscale (a permutation or JPEG keeps it grey)
    plain = image.float() / 255
    assert all((o - plain).abs().mean() > 1e-3 for o in outputs)  # JPEG always applies
    with pytest.raises(ValueError, match="expected a uint8 \\[3, H, W\\] image"):
        anyup_augment(plain, torch.Generator())


def test_the_loss_falls_when_training_a_toy_that_can_fit_it():
    batch = anyup_batch(count=3, seed=4)
    constant = torch.randn(3, CHANNELS, 1, 1)
    for name in batch.features:
        batch.features[name] = constant.expand(-1, -1, 8, 8).clone()  # every view agrees: the identity fits
    objective, toy = AnyUpObjective(), GuidedToy(CHANNELS)
    with torch.no_grad():
        toy.gain.fill_(0.5)
        toy.bias.fill_(0.3)
    optimizer = torch.optim.Adam(toy.parameters(), lr=0.05)
    torch.manual_seed(0)
    losses = []
    for _ in range(25):
        loss = objective.loss(toy, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert 0 <= losses[-1] < 0.1 * losses[0], losses[::10]


@pytest.fixture(autouse=True)
def single_thread():
    """Every test here computes on tiny tensors, far faster on one thread on a busy machine."""
    with one_thread():
        yield


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    with one_thread():
        yield save_tiny_weights(tmp_path_factory.mktemp("weights") / "tiny.safetensors")


def records(run: Path, kind: str) -> list[dict]:
    return [
        r for r in map(json.loads, (run / "train_log.jsonl").read_text().splitlines()) if r["type"] == kind
    ]


def anyup_args(images, run, weights, cache, *extra):
    return train_args(
        images, run, weights, "--upsampler", "objective-toy", "--objective", "anyup",
        "--val-fraction", "0.25", "--cache", str(cache), "--lr", "0.01", "--seed", "4", *extra,
    )  # fmt: skip


def test_trains_from_the_cli_on_exact_cached_crops_and_resumes_as_an_uninterrupted_run(tmp_path, weights):
    images = write_image_tree(tmp_path / "imgs", count=5, corrupt=False)
    cache = tmp_path / "cache"
    with one_thread():
        assert main(anyup_args(images, tmp_path / "straight", weights, cache, "--epochs", "3")) == 0
        assert main(anyup_args(images, tmp_path / "resumed", weights, cache, "--epochs", "1")) == 0
        assert (
            main(anyup_args(images, tmp_path / "resumed", weights, cache, "--epochs", "3", "--resume")) == 0
        )

    straight = records(tmp_path / "straight", "epoch")
    assert [r["epoch"] for r in straight] == [0, 1, 2]
    for key in ("val_cosine_upsampler", "val_cosine_bilinear", "val_loss_upsampler", "val_downsampling_loss"):
        assert all(key in r for r in straight), key
    assert straight[0]["val_loss_bilinear"] == straight[-1]["val_loss_bilinear"]
    config = json.loads((tmp_path / "straight" / "config.json").read_text())
    assert config["training"]["objective_name"] == "anyup" and "AnyUp" in config["training"]["objective"]

    steps = [(r["epoch"], r["step"], r["loss"]) for r in records(tmp_path / "straight", "step")]
    resumed = [(r["epoch"], r["step"], r["loss"]) for r in records(tmp_path / "resumed", "step")]
    assert [s[:2] for s in resumed] == [s[:2] for s in steps] and len(steps) == 6
    for (_, _, a), (_, _, b) in zip(steps, resumed, strict=True):
        assert abs(a - b) <= 1e-6
    a, b = (load_file(str(tmp_path / run / "model.safetensors")) for run in ("straight", "resumed"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)

    files = sorted(cache.rglob("*.safetensors"))
    cached = load_file(str(files[0]))
    assert set(cached) == {view.name for view in VIEWS} and all(
        t.shape[-2:] == (2, 2) for t in cached.values()
    )
    image = next(im for im in scan_images(images).images if files[0].stem == im.digest)
    pixels = load_views(image, VIEWS, 64, 4)
    assert pixels["crop_12"].shape == (3, 32, 32)
    backbone = create_backbone(TINY_NAME, weights=weights)
    for name in ("low", "crop_12"):
        with torch.no_grad():
            expected = backbone(backbone.normalize(pixels[name][None].float() / 255))[0].half()
        assert torch.equal(cached[name], expected), name


def test_wrong_loss_or_image_size_is_a_clear_error(tmp_path, weights, capsys):
    images = write_image_tree(tmp_path / "imgs", count=2, corrupt=False)
    run = tmp_path / "run"
    assert main(anyup_args(images, run, weights, tmp_path / "cache", "--loss", "l2")) == 2
    assert "--loss l2: objective anyup trains with its original's own loss" in capsys.readouterr().err
    with one_thread():
        assert main(anyup_args(images, run, weights, tmp_path / "cache", "--image-size", "96")) == 2
    assert "grid 6x6 tokens is not a multiple of 4" in capsys.readouterr().err
