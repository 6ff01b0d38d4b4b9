"""Objectives are plug-ins: one defined here registers, declares its views (scales, crops, augmentation
draws), and `featlift train` caches exactly those views, trains on them and logs what the objective reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from train_helpers import TINY_NAME, one_thread, save_tiny_weights, train_args, write_image_tree

from featlift import create_backbone
from featlift.cli import main
from featlift.errors import FeatliftError
from featlift.train import TrainConfig, train
from featlift.train.data import scan_images
from featlift.train.objectives import Objective, available_objectives, get_objective, register_objective
from featlift.train.state import RESUME_KEYS, check_resumable
from featlift.train.views import View, check_view_sizes, load_views
from featlift.upsamplers import Upsampler, register_upsampler
from featlift.upsamplers.base import Capabilities


@register_objective("zoom-test")
class ZoomObjective(Objective):
    """LiFT's 2x pass from the half image to the full one, and from the full image's top-left quarter to the
    same quarter seen at twice the size (a crop)."""

    views = (View("full", 1.0), View("half", 0.5), View("corner", 2.0, crop=(0.0, 0.0, 0.5, 0.5)))

    def loss(self, upsampler, batch):
        full, half, corner = (batch.features[name] for name in ("full", "half", "corner"))
        whole = self.feature_loss(upsampler.upsample_2x(half, batch.guide("half")), full)
        guide = batch.guide("full", stream=1)
        quarter = guide[..., : guide.shape[-2] // 2, : guide.shape[-1] // 2]
        zoomed = upsampler.upsample_2x(full[..., : full.shape[-2] // 2, : full.shape[-1] // 2], quarter)
        return whole + self.feature_loss(zoomed, corner)


@register_objective("draws-test")
class JitteredHalfObjective(Objective):
    """LiFT's 2x pass from two photometric augmentation draws of the half image to the plain full image."""

    views = (View("s1", 1.0), View("jittered0", 0.5, draw=0), View("jittered1", 0.5, draw=1))
    sums = ("cosine",)

    def loss(self, upsampler, batch):
        target = batch.features["s1"]
        return sum(
            self.feature_loss(upsampler.upsample_2x(batch.features[name], batch.guide(name)), target)
            for name in ("jittered0", "jittered1")
        )

    def validation_sums(self, upsampler, batch):
        lifted = upsampler.upsample_2x(batch.features["jittered0"], batch.guide("jittered0"))
        cosine = F.cosine_similarity(lifted, batch.features["s1"], dim=1).mean(dim=(1, 2)).sum()
        return cosine.double()[None]

    def validation_metrics(self, sums, images):
        return {"val_cosine_draw0": round(sums["cosine"] / images, 5)}

    def after_epoch(self, upsampler, end):
        return {
            "hook_train_images": len(end.train_images),
            "hook_evaluated": end.evaluate(end.train_images)[1],
        }


@register_upsampler("objectiveless-test")
class ObjectivelessUpsampler(Upsampler):
    capabilities = Capabilities(guide="none", fitting="trained")

    def __init__(self, channels: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(channels, 1, 1))

    def forward(self, features, guide, output_size):
        return F.interpolate(features, size=output_size, mode="bilinear") * self.scale


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """The tiny ViT's weights; the tests that train with them run on one thread (tiny tensors)."""
    with one_thread():
        yield save_tiny_weights(tmp_path_factory.mktemp("weights") / "tiny.safetensors")


def cache_files(cache: Path) -> list[Path]:
    return sorted(cache.rglob("*.safetensors"))


def test_an_objective_defined_here_trains_through_the_cli_on_scales_and_a_crop(tmp_path, weights):
    images = write_image_tree(tmp_path / "imgs", count=4, corrupt=False)
    run = tmp_path / "run"
    args = train_args(
        images, run, weights, "--epochs", "1", "--val-fraction", "0", "--objective", "zoom-test"
    )
    assert main(args) == 0
    files = cache_files(run / "cache")
    assert len(files) == 4 and files[0].parent.parent.name.split("-")[-1].startswith("views")
    channels = create_backbone(TINY_NAME, weights=weights).channels
    for path in files:  # 64 px, patch 16: full 4x4 tokens, half 2x2, the quarter at twice the size 4x4
        shapes = {name: tuple(t.shape) for name, t in load_file(str(path)).items()}
        assert shapes == {"full": (channels, 4, 4), "half": (channels, 2, 2), "corner": (channels, 4, 4)}
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["settings"]["objective"] == "zoom-test"
    assert [r["type"] for r in log] == ["start", "step", "step", "epoch"]
    assert "val_images" not in log[-1]  # the objective declares no validation
    config = json.loads((run / "config.json").read_text())
    assert config["training"]["objective_name"] == "zoom-test"
    assert " --objective zoom-test " in config["training"]["command"]

    # the corner's cached features are the backbone's of the top-left quarter resized to 2S
    backbone = create_backbone(TINY_NAME, weights=weights)
    image = scan_images(images).images[0]
    corner = load_views(image, ZoomObjective.views, 64, 0)["corner"]
    assert corner.shape == (3, 64, 64)
    with torch.no_grad():
        expected = backbone(backbone.normalize(corner[None].float() / 255))[0].half()
    assert torch.equal(
        load_file(
            str(
                run / "cache" / files[0].parent.parent.name / image.digest[:2] / f"{image.digest}.safetensors"
            )
        )["corner"],
        expected,
    )


def test_augmentation_draws_are_cached_per_seed_and_the_objective_reports_its_metrics(tmp_path, weights):
    images = write_image_tree(tmp_path / "imgs", count=4, corrupt=False)
    config = TrainConfig(
        images=str(images),
        out=str(tmp_path / "run"),
        backbone=TINY_NAME,
        weights=str(weights),
        objective="draws-test",
        epochs=1,
        batch_size=2,
        image_size=64,
        val_fraction=0.25,
        cache=str(tmp_path / "cache"),
        device="cpu",
        progress=False,
    )
    result = train(config)
    record = result.final
    assert 0 < record["val_cosine_draw0"] <= 1 and record["val_images"] == 1
    assert record["hook_train_images"] == 3 and record["hook_evaluated"] == 3
    files = cache_files(tmp_path / "cache")
    assert len(files) == 4 and all(set(load_file(str(f))) == {"s1", "jittered0", "jittered1"} for f in files)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["training"]
    assert saved["command"].startswith("TrainConfig(images=") and "objective='draws-test'" in saved["command"]

    image = scan_images(images).images[0]
    views = JitteredHalfObjective.views
    first, again, other_seed = (load_views(image, views, 64, seed) for seed in (0, 0, 1))
    assert torch.equal(first["jittered0"], again["jittered0"])  # deterministic in (seed, image, draw)
    assert not torch.equal(first["jittered0"], first["jittered1"])
    assert not torch.equal(first["jittered0"], other_seed["jittered0"])
    train(TrainConfig(**{**config.__dict__, "out": str(tmp_path / "run2"), "seed": 1, "command": None}))
    assert len({f.parent.parent for f in cache_files(tmp_path / "cache")}) == 2  # another seed, other draws


def test_unknown_or_missing_objective_is_a_clear_error(tmp_path, weights, capsys):
    images = write_image_tree(tmp_path / "imgs", count=2, corrupt=False)
    assert main(train_args(images, tmp_path / "run", weights, "--objective", "nonesuch")) == 2
    err = capsys.readouterr().err
    assert "--objective nonesuch: unknown training objective 'nonesuch'; available: " in err and "lift" in err
    assert ", ".join(available_objectives()) in err and "lift" in available_objectives()
    assert main(train_args(images, tmp_path / "run", weights, "--upsampler", "objectiveless-test")) == 2
    err = capsys.readouterr().err
    assert "objectiveless-test declares no training objective; pass --objective NAME" in err
    no_residual = ["--upsampler", "objectiveless-test", "--objective", "zoom-test", "--no-residual"]
    assert main(train_args(images, tmp_path / "run", weights, *no_residual)) == 2
    assert "--no-residual: upsampler objectiveless-test has no residual option" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_runs_saved_before_objectives_were_recorded_resume_as_lift(tmp_path):
    settings = {key: None for key in RESUME_KEYS if key != "objective"}
    check_resumable(settings, {**settings, "objective": "lift"}, tmp_path)
    with pytest.raises(FeatliftError, match="objective: was 'lift', now 'zoom-test'"):
        check_resumable(settings, {**settings, "objective": "zoom-test"}, tmp_path)


def test_registration_checks_the_class_and_its_views():
    with pytest.raises(FeatliftError, match="already registered"):
        register_objective("zoom-test")(JitteredHalfObjective)
    with pytest.raises(FeatliftError, match="no subclass of Objective"):
        register_objective("not-an-objective")(dict)
    with pytest.raises(FeatliftError, match="declares no views"):
        register_objective("viewless-test")(type("Viewless", (Objective,), {}))
    with pytest.raises(FeatliftError, match="view names must differ"):
        register_objective("twice-test")(type("Twice", (Objective,), {"views": (View("a"), View("a", 0.5))}))
    with pytest.raises(ValueError, match="crop"):
        View("box", crop=(0.5, 0.0, 0.75, 1.0))
    assert get_objective("zoom-test") is ZoomObjective


def test_image_size_must_fit_every_view():
    check_view_sizes(ZoomObjective.views, 64, 16, "zoom-test")
    with pytest.raises(FeatliftError, match=r"--image-size 48: .* multiple of 32 \(e.g. 32 or 64\)"):
        check_view_sizes(ZoomObjective.views, 48, 16, "zoom-test")
    with pytest.raises(FeatliftError, match=r"multiple of 64"):
        check_view_sizes(get_objective("lift").views, 96, 16, "lift")
