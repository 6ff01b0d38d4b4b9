"""JAFAR's objective: its loss on known answers and against the original's formula, per-image draws of the
cached downscale views that a resumed run repeats, and training through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from objective_toys import GuidedToy, normalize, random_batch
from safetensors.torch import load_file
from train_helpers import TINY_NAME, one_thread, save_tiny_weights, train_args, write_image_tree

from featlift import create_backbone
from featlift.cli import main
from featlift.errors import FeatliftError
from featlift.train.data import scan_images
from featlift.train.objectives import get_objective
from featlift.train.objectives.jafar import (
    DOWNSCALE_FACTORS,
    VIEWS,
    JafarObjective,
    downscaled_view_name,
    jafar_guide,
)
from featlift.train.objectives.reconstruction import (
    reconstruction_loss,
    reconstruction_terms,
)
from featlift.train.views import load_views

SIZE = 256  # the tiny ViT's patch 16 x the 16 patches the downscale factors need
DOWN_NAMES = [downscaled_view_name(u) for u in DOWNSCALE_FACTORS]


def original_cosine_mse(pred, target):
    """JAFAR's ``Cosine_MSE`` as its loss.py writes it with torch's modules (the reference for ours)."""
    pred = pred.permute(0, 2, 3, 1).reshape(-1, pred.shape[1])
    target = target.permute(0, 2, 3, 1).reshape(-1, target.shape[1])
    low, high = target.min(dim=1, keepdim=True).values, target.max(dim=1, keepdim=True).values
    cosine = torch.nn.CosineEmbeddingLoss()(pred, target, torch.ones(len(pred)))
    mse = torch.nn.MSELoss()((pred - low) / (high - low + 1e-6), (target - low) / (high - low + 1e-6))
    return cosine + mse


def test_reconstruction_terms_on_known_answers():
    torch.manual_seed(0)
    target = torch.randn(2, 8, 3, 5)
    cosine, mse = reconstruction_terms(target, target)
    assert cosine.abs().max() < 1e-6 and mse.abs().max() == 0  # identical maps: 0

    assert torch.allclose(reconstruction_terms(-target, target)[0], torch.full((2,), 2.0), atol=1e-6)
    cosine, mse = reconstruction_terms(3 * target, target)  # a rescaled prediction: cosine 0, MSE not
    assert cosine.abs().max() < 1e-6 and mse.min() > 0.1

    e0, e1 = torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 2)
    e0[:, 0], e1[:, 1] = 1.0, 1.0  # orthogonal unit vectors everywhere: cosine term 1
    cosine, mse = reconstruction_terms(e0, e1)
    span = 1.0 + 1e-6  # the target's channel range (0 to 1) + the original's epsilon
    assert torch.allclose(cosine, torch.ones(1)) and torch.allclose(mse, torch.tensor([2 / 4 / span**2]))

    ramp = torch.linspace(0.0, 1.0, 6).view(1, 6, 1, 1).expand(2, 6, 3, 4)  # each position spans [0, 1]
    _, mse = reconstruction_terms(ramp + 0.3, ramp)  # a constant offset d: MSE = d^2 / span^2
    assert torch.allclose(mse, torch.full((2,), 0.09 / span**2), rtol=1e-6)
    _, mse = reconstruction_terms(10 * ramp + 0.3, 10 * ramp)  # the target's range: d^2 / (10 + 1e-6)^2
    assert torch.allclose(mse, torch.full((2,), 0.09 / (10 + 1e-6) ** 2), rtol=1e-5)


def test_reconstruction_loss_equals_the_originals_formula():
    torch.manual_seed(1)
    pred, target = torch.randn(3, 16, 4, 6), torch.randn(3, 16, 4, 6) * 2 + 0.5
    expected = original_cosine_mse(pred, target)
    assert abs(float(reconstruction_loss(pred, target)) - float(expected)) <= 1e-6 * float(expected)
    with pytest.raises(ValueError, match=r"prediction \[3, 16, 4, 6\] and target \[3, 16, 2, 3\]"):
        reconstruction_loss(pred, target[..., :2, :3])


def jafar_batch(count: int = 6, seed: int = 0, size: int = 64, patch: int = 4):
    return random_batch(
        {
            "full": (count, size, size, patch),
            **{
                name: (count, int(size * u), int(size * u), patch)
                for name, u in zip(DOWN_NAMES, DOWNSCALE_FACTORS, strict=True)
            },
        },
        channels=8,
        seed=seed,
    )


def test_draws_depend_on_seed_epoch_and_image_only_and_cover_the_pool():
    objective, toy, batch = JafarObjective(), GuidedToy(8), jafar_batch()
    batch.seed, batch.epoch = 5, 0
    first = objective.drawn_views(toy, batch)
    torch.manual_seed(123)  # torch's global generator plays no part
    assert first == objective.drawn_views(toy, batch) and set(first) <= set(DOWN_NAMES)
    order = [3, 0, 5, 1, 4, 2]  # an image draws the same wherever it is in the batch
    shuffled = jafar_batch()
    shuffled.seed, shuffled.epoch = 5, 0
    shuffled.pixels = {k: v[order] for k, v in batch.pixels.items()}
    assert objective.drawn_views(toy, shuffled) == [first[k] for k in order]
    batch.seed = 6
    other_seed = objective.drawn_views(toy, batch)
    batch.seed = 5
    seen = []
    for epoch in range(60):
        batch.epoch = epoch
        seen.append(objective.drawn_views(toy, batch))
    assert seen[0] == first and seen[1] != first and other_seed != first
    counts = [sum(draw.count(name) for draw in seen) for name in DOWN_NAMES]
    assert min(counts) > 0.12 * 360 and max(counts) < 0.28 * 360, counts  # uniform over the 5 views


def test_loss_upsamples_each_drawn_view_with_the_halved_full_image_as_guide():
    objective, toy, batch = JafarObjective(), GuidedToy(8), jafar_batch(seed=2)
    with torch.no_grad():
        toy.guide_mix.weight.normal_()
        toy.gain.normal_()
    guide = jafar_guide(batch)
    expected_guide = F.interpolate(
        normalize(batch.pixels["full"].float() / 255), scale_factor=0.5, mode="bilinear"
    )
    assert guide.shape[-1] == 32 and torch.allclose(guide, expected_guide, atol=1e-6)
    torch.manual_seed(0)
    views = objective.drawn_views(toy, batch)
    assert len(set(views)) > 1  # several groups in one batch
    target = batch.features["full"]
    per_image = torch.cat(
        [toy(batch.features[v][k : k + 1], guide[k : k + 1], target.shape[-2:]) for k, v in enumerate(views)]
    )
    assert torch.allclose(objective.loss(toy, batch), reconstruction_loss(per_image, target), atol=1e-6)


def test_the_loss_falls_when_training_a_toy_that_can_fit_it():
    batch = jafar_batch(count=4, seed=3)
    constant = torch.randn(4, 8, 1, 1)  # spatially constant features: bilinear upsampling is exact
    batch.features["full"] = constant.expand(-1, -1, 16, 16).clone()
    for name in DOWN_NAMES:
        grid = batch.features[name].shape[-2:]
        batch.features[name] = (constant / 3 - 0.2).expand(-1, -1, *grid).clone()  # full = 3 x low + 0.6
    objective, toy = JafarObjective(), GuidedToy(8)
    optimizer = torch.optim.Adam(toy.parameters(), lr=0.05)
    torch.manual_seed(0)
    losses = []
    for _ in range(40):
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
    lines = (run / "train_log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


def jafar_args(images, run, weights, cache, *extra):
    return train_args(
        images,
        run,
        weights,
        "--upsampler",
        "objective-toy",
        "--objective",
        "jafar",
        "--image-size",
        str(SIZE),
        "--val-fraction",
        "0.25",
        "--cache",
        str(cache),
        "--lr",
        "0.01",
        "--seed",
        "2",
        *extra,
    )


def test_trains_from_the_cli_on_exact_cached_views_and_resumes_as_an_uninterrupted_run(tmp_path, weights):
    images = write_image_tree(tmp_path / "imgs", count=5, corrupt=False)
    cache = tmp_path / "cache"
    with one_thread():
        assert main(jafar_args(images, tmp_path / "straight", weights, cache, "--epochs", "3")) == 0
        assert main(jafar_args(images, tmp_path / "resumed", weights, cache, "--epochs", "1")) == 0
        assert (
            main(jafar_args(images, tmp_path / "resumed", weights, cache, "--epochs", "3", "--resume")) == 0
        )

    straight = records(tmp_path / "straight", "epoch")
    assert [r["epoch"] for r in straight] == [0, 1, 2]
    for key in (
        "val_cosine_upsampler_2x",
        "val_cosine_bilinear_2x",
        "val_loss_upsampler_4x",
        "val_loss_bilinear_4x",
    ):
        assert all(key in r for r in straight), key
    assert straight[0]["val_cosine_bilinear_2x"] == straight[-1]["val_cosine_bilinear_2x"]  # fixed baseline
    assert (
        straight[-1]["val_loss_upsampler_2x"] < straight[-1]["val_loss_bilinear_2x"]
    )  # it learned something
    config = json.loads((tmp_path / "straight" / "config.json").read_text())
    assert config["training"]["objective_name"] == "jafar" and "JAFAR" in config["training"]["objective"]

    steps = [(r["epoch"], r["step"], r["loss"]) for r in records(tmp_path / "straight", "step")]
    resumed = [(r["epoch"], r["step"], r["loss"]) for r in records(tmp_path / "resumed", "step")]
    assert [s[:2] for s in resumed] == [s[:2] for s in steps] and len(steps) == 6
    for (_, _, a), (_, _, b) in zip(steps, resumed, strict=True):
        assert abs(a - b) <= 1e-6
    a, b = (load_file(str(tmp_path / run / "model.safetensors")) for run in ("straight", "resumed"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)

    # the cache holds every view; a downscaled view's features are the backbone's on that view's pixels
    files = sorted(cache.rglob("*.safetensors"))
    assert len(files) == 5
    cached = load_file(str(files[0]))
    assert {name: tuple(t.shape[-2:]) for name, t in cached.items()} == {
        "full": (16, 16),
        **{name: (round(16 * u),) * 2 for name, u in zip(DOWN_NAMES, DOWNSCALE_FACTORS, strict=True)},
    }
    image = next(im for im in scan_images(images).images if files[0].stem == im.digest)
    backbone = create_backbone(TINY_NAME, weights=weights)
    pixels = load_views(image, VIEWS, SIZE, 2)
    for name in ("full", DOWN_NAMES[1]):
        with torch.no_grad():
            expected = backbone(backbone.normalize(pixels[name][None].float() / 255))[0].half()
        assert torch.equal(cached[name], expected), name


def test_wrong_loss_or_image_size_is_a_clear_error(tmp_path, weights, capsys):
    images = write_image_tree(tmp_path / "imgs", count=2, corrupt=False)
    run = tmp_path / "run"
    assert main(jafar_args(images, run, weights, tmp_path / "cache", "--loss", "l1")) == 2
    assert "--loss l1: objective jafar trains with its original's own loss" in capsys.readouterr().err
    assert main([*jafar_args(images, run, weights, tmp_path / "cache"), "--image-size", "128"]) == 2
    assert "--image-size 128: with patch size 16 the views of objective jafar" in capsys.readouterr().err
    with pytest.raises(FeatliftError, match="--loss l2"):
        get_objective("jafar")(loss="l2")


def test_the_loop_hands_every_step_the_runs_seed_and_the_steps_epoch(tmp_path, weights, monkeypatch):
    seen = []
    original = JafarObjective.loss

    def spy(self, upsampler, batch):
        seen.append((batch.seed, batch.epoch))
        return original(self, upsampler, batch)

    monkeypatch.setattr(JafarObjective, "loss", spy)
    images = write_image_tree(tmp_path / "imgs", count=5, corrupt=False)
    with one_thread():
        args = jafar_args(images, tmp_path / "run", weights, tmp_path / "cache", "--epochs", "2")
        assert main([*args, "--batch-size", "2"]) == 0
    assert seen and {seed for seed, _ in seen} == {2}
    assert sorted({epoch for _, epoch in seen}) == [0, 1]
    assert [epoch for _, epoch in seen] == sorted(epoch for _, epoch in seen)
