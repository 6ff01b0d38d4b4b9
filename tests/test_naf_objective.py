"""NAF's training objective (`featlift.train.objectives.naf`): its loss and guide, `featlift train --upsampler naf`
from the CLI with a resume that repeats the uninterrupted run, and `featlift extract` with the trained module."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from train_helpers import TINY_NAME, one_thread, save_tiny_weights, train_args, write_image_tree

from featlift import load_checkpoint
from featlift.cli import main
from featlift.errors import FeatliftError
from featlift.train.batches import Batch
from featlift.train.objectives import get_objective
from featlift.train.objectives.naf import NafObjective, naf_guide
from featlift.upsamplers.naf import NAF


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return save_tiny_weights(tmp_path_factory.mktemp("weights") / "tiny.safetensors")


def batch(grid: int = 8, channels: int = 8, images: int = 2, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    side = 16 * grid
    pixels = {
        "full": torch.randint(0, 256, (images, 3, side, side), generator=g, dtype=torch.uint8),
        "half": torch.randint(0, 256, (images, 3, side // 2, side // 2), generator=g, dtype=torch.uint8),
    }
    features = {
        "full": torch.randn(images, channels, grid, grid, generator=g),
        "half": torch.randn(images, channels, grid // 2, grid // 2, generator=g),
    }
    return Batch(pixels, features, list(range(images)), lambda x: (x - 0.5) / 0.25, torch.device("cpu"))


def test_naf_is_trained_by_its_objective_with_its_own_loss():
    assert NAF.capabilities.objective == "naf" and get_objective("naf") is NafObjective
    assert [(v.name, v.scale) for v in NafObjective.views] == [("full", 1.0), ("half", 0.5)]
    with pytest.raises(FeatliftError, match="trains with its original's own loss"):
        NafObjective("l2")


def test_the_guide_is_the_full_view_at_four_pixels_per_target_token_at_most_224():
    b = batch(grid=8)  # 128 px views
    guide = naf_guide(b, (8, 8))
    assert guide.shape == (2, 3, 32, 32)
    expected = F.interpolate(b.guide("full"), size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(guide, expected)
    assert naf_guide(batch(grid=64), (64, 60)).shape[-2:] == (224, 224)


def test_the_loss_is_the_mse_of_the_2x_prediction_to_the_full_features():
    torch.manual_seed(0)
    naf = NAF(dim=32, rope_heads=2, kernel_size=3).eval()
    b = batch(grid=8)
    loss = NafObjective().loss(naf, b)
    with torch.no_grad():
        pred = naf(b.features["half"], naf_guide(b, (8, 8)), (8, 8))
    assert loss.shape == () and torch.isclose(loss, ((pred - b.features["full"]) ** 2).mean(), rtol=1e-5)
    sums = NafObjective().validation_sums(naf, b)
    assert torch.isclose(sums[0].float(), loss * 2, rtol=1e-4)  # the per-image MSEs, summed over 2 images
    bilinear = F.interpolate(b.features["half"], size=(8, 8), mode="bilinear", align_corners=False)
    expected_bilinear = ((bilinear - b.features["full"]) ** 2).mean(dim=(1, 2, 3)).sum()
    assert torch.isclose(sums[1].float(), expected_bilinear, rtol=1e-5)


def steps(run: Path) -> list[tuple[int, int, float]]:
    lines = (run / "train_log.jsonl").read_text().splitlines()
    return [(r["epoch"], r["step"], r["loss"]) for r in map(json.loads, lines) if r["type"] == "step"]


def test_featlift_train_naf_resumes_as_an_uninterrupted_run_and_extracts(tmp_path, weights):
    images = write_image_tree(tmp_path / "imgs", count=3, corrupt=False)

    def train(run: str, *extra: str) -> int:
        args = train_args(images, tmp_path / run, weights, "--upsampler", "naf", "--image-size", "64")
        return main(
            [*args, "--val-fraction", "0.34", "--cache", str(tmp_path / "cache"), "--seed", "1", *extra]
        )

    with one_thread():
        assert train("straight", "--epochs", "2") == 0
        assert train("resumed", "--epochs", "1") == 0
        assert train("resumed", "--epochs", "2", "--resume") == 0
        config = json.loads((tmp_path / "straight" / "config.json").read_text())
        assert config["upsampler"]["name"] == "naf" and config["training"]["objective_name"] == "naf"
        straight, resumed = steps(tmp_path / "straight"), steps(tmp_path / "resumed")
        assert [s[:2] for s in straight] == [s[:2] for s in resumed] and len(straight) == 2
        for (_, _, a), (_, _, b) in zip(straight, resumed, strict=True):
            assert abs(a - b) <= 1e-6 * max(1.0, abs(a))
        a, b = (load_file(str(tmp_path / run / "model.safetensors")) for run in ("straight", "resumed"))
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
        module, _ = load_checkpoint(tmp_path / "straight")
        assert isinstance(module, NAF) and module.config()["dim"] == 256

        out = tmp_path / "features"
        argv = ["-q", "extract", str(images), "--backbone", TINY_NAME, "--weights", str(weights)]
        argv += ["--upsampler", "naf", "--checkpoint", str(tmp_path / "straight"), "--size", "64"]
        argv += ["--output-size", "16", "--workers", "0", "--out", str(out), "--device", "cpu"]
        assert main(argv) == 0
    written = sorted(out.rglob("*.safetensors"))
    assert len(written) == 3
    features = load_file(str(written[0]))["features"]
    assert features.shape == (192, 16, 16) and torch.isfinite(features).all()
