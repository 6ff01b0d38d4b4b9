"""Adding a method takes one file: this file alone defines a toy upsampler and its own training objective,
then trains, extracts, evaluates, benches and visualises it through the CLI's `main(argv)`, without touching
featlift's code. It is the proof behind the README's "Adding an upsampler"."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_TIMM_NAME, write_images
from PIL import Image
from torch import nn

from featlift.cli import main
from featlift.extract import load_features
from featlift.train.objectives import Objective, register_objective
from featlift.train.views import View
from featlift.upsamplers import Upsampler, register_upsampler
from featlift.upsamplers.base import Capabilities, check_inputs, resize_features


@register_upsampler("toy-guided")
class ToyGuided(Upsampler):
    """Bilinear features plus a learned 1x1 correction from the guide image at the output size."""

    capabilities = Capabilities(guide="output", output_sizes="any", objective="toy-half-to-full")
    options = ("gain",)

    def __init__(self, channels: int, gain: float = 1.0):
        super().__init__()
        self.channels, self.gain = channels, gain
        self.correction = nn.Conv2d(channels + 3, channels, kernel_size=1)
        nn.init.zeros_(self.correction.weight)
        nn.init.zeros_(self.correction.bias)

    def config(self):
        return {"channels": self.channels, "gain": self.gain}

    def native_output_size(self, grid):
        return grid[0] * 4, grid[1] * 4

    def forward(self, features, guide, output_size):
        size = check_inputs(features, guide, output_size)
        coarse = resize_features(features, size)
        guide = F.interpolate(guide, size=size, mode="bilinear", align_corners=False)
        return self.gain * (coarse + self.correction(torch.cat([coarse, guide], dim=1)))


@register_objective("toy-half-to-full")
class ToyHalfToFull(Objective):
    """Predict the features of the full image from those of the half-size one and the full image."""

    views = (View("full", 1.0), View("half", 0.5))
    sums = ("cosine", "images_seen")
    description = "cosine(toy(f(img/2), img), f(img))"

    def _predict(self, upsampler, batch):
        full = batch.features["full"]
        return upsampler(batch.features["half"], batch.guide("full"), tuple(full.shape[-2:])), full

    def loss(self, upsampler, batch):
        return self.feature_loss(*self._predict(upsampler, batch))

    def validation_sums(self, upsampler, batch):
        pred, full = self._predict(upsampler, batch)
        cosine = F.cosine_similarity(pred, full, dim=1).mean(dim=(1, 2)).sum()
        return torch.stack([cosine.double(), torch.tensor(float(len(batch)), dtype=torch.float64)])

    def validation_metrics(self, sums, images):
        return {
            "val_cosine_toy": round(sums["cosine"] / images, 5),
            "val_images_toy": int(sums["images_seen"]),
        }


BACKBONE = ["--backbone", TINY_TIMM_NAME]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_timm_weights):
    root = tmp_path_factory.mktemp("plugin")
    write_images(root / "images", count=6, size=(96, 96))
    run = root / "run"
    code = main(
        ["-q", "train", str(root / "images"), "--out", str(run), "--upsampler", "toy-guided", *BACKBONE,
         "--weights", str(tiny_timm_weights), "--image-size", "64", "--epochs", "2", "--batch-size", "2",
         "--val-fraction", "0.34", "--device", "cpu"]
    )  # fmt: skip
    assert code == 0
    return root, run, tiny_timm_weights


def test_the_toy_method_trains_with_its_own_objective(trained):
    root, run, _ = trained
    config = json.loads((run / "config.json").read_text())
    assert config["upsampler"] == {"name": "toy-guided", "args": {"channels": 192, "gain": 1.0}}
    epochs = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    epochs = [e for e in epochs if e["type"] == "epoch"]
    assert len(epochs) == 2 and all(0 < e["val_cosine_toy"] <= 1 and e["val_images_toy"] == 2 for e in epochs)
    cached = {f.name for f in (run / "cache").rglob("*.safetensors")}
    assert len(cached) == 6  # one file per image, holding exactly the objective's two views
    from safetensors import safe_open

    with safe_open(str(next((run / "cache").rglob("*.safetensors"))), framework="pt") as handle:
        assert sorted(handle.keys()) == ["full", "half"]


def test_the_trained_toy_extracts_with_its_options_and_guide(trained, tmp_path):
    root, run, weights = trained
    photo = tmp_path / "photo.png"
    Image.fromarray((torch.rand(128, 128, 3) * 255).byte().numpy()).save(photo)
    code = main(
        ["-q", "extract", str(photo), "--upsampler", "toy-guided", "--checkpoint", str(run), "--option",
         "gain=2", *BACKBONE, "--weights", str(weights), "--size", "64", "--out", str(tmp_path / "out"),
         "--workers", "0", "--device", "cpu"]
    )  # fmt: skip
    assert code == 0
    features, meta = load_features(next((tmp_path / "out").glob("*.safetensors")))
    assert features.shape == (192, 16, 16)  # its native 4x of the 4x4 grid
    assert meta["upsampler"] == "toy-guided" and json.loads(meta["upsampler_options"]) == {"gain": 2.0}


def test_the_toy_is_evaluated_benched_and_visualised_next_to_the_others(trained, tmp_path, capsys):
    root, run, weights = trained
    variants = f"none,bilinear,toy-guided:{run},toy-guided:{run}:gain=0.5:size=8x8"
    photos = tmp_path / "photos"
    write_images(photos, count=2, size=(80, 80))
    common = [*BACKBONE, "--weights", str(weights), "--device", "cpu"]

    assert main(["-q", "eval", "warp", "--data", str(photos), "--size", "64", "--variant", variants,
                 "--keypoints", "8", "--out", str(tmp_path / "warp"), *common]) == 0  # fmt: skip
    rows = {r["variant"]: r for r in json.loads((tmp_path / "warp" / "results.json").read_text())["results"]}
    assert list(rows) == variants.split(",")
    assert all(0 <= r["metrics"]["PCK@0.1"] <= 100 for r in rows.values())

    assert main(["-q", "bench", "--sizes", "64", "--variants", variants, "--batch-sizes", "1", "--repeats", "1",
                 "--warmup", "0", "--out", str(tmp_path / "bench"), *common]) == 0  # fmt: skip
    bench = json.loads((tmp_path / "bench" / "bench.json").read_text())
    grids = {r["variant"]: r["output_grid"] for r in bench["results"]}
    assert grids[f"toy-guided:{run}"] == [16, 16] and grids[f"toy-guided:{run}:gain=0.5:size=8x8"] == [8, 8]

    figure = tmp_path / "pca.png"
    assert main(["-q", "viz", "pca", str(next(photos.iterdir())), "--size", "64", "--variant", variants,
                 "--panel", "64", "--out", str(figure), *common]) == 0  # fmt: skip
    assert Image.open(figure).size[0] >= 4 * 64
