"""UPLiFT's objective: the original's six multi-step L2 terms; `featlift train --upsampler uplift` from the CLI
resuming as an uninterrupted run; `featlift extract` with the trained checkpoint."""

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
from featlift.images import load_image
from featlift.train.batches import Batch
from featlift.train.objectives import get_objective
from featlift.train.objectives.uplift import VIEWS, UpliftObjective
from featlift.upsamplers.uplift import UPLiFT

SIZE = "128"  # s8 = 16 px: one token of the tiny patch-16 ViT


@pytest.fixture(autouse=True)
def single_thread():
    with one_thread():
        yield


def toy_batch(channels: int = 8, patch: int = 16, side: int = 128) -> Batch:
    torch.manual_seed(0)
    pixels = {v.name: torch.randint(0, 256, (2, 3, int(side * v.scale), int(side * v.scale)), dtype=torch.uint8)
              for v in VIEWS}  # fmt: skip
    features = {v.name: torch.randn(2, channels, int(side * v.scale) // patch, int(side * v.scale) // patch)
                for v in VIEWS}  # fmt: skip
    return Batch(pixels, features, [0, 1], lambda x: (x - 0.5) / 0.25, torch.device("cpu"))


def test_the_loss_is_the_originals_six_multi_step_terms():
    assert [v.name for v in VIEWS] == ["s1", "s2", "s4", "s8"] and [v.scale for v in VIEWS] == [
        1,
        0.5,
        0.25,
        0.125,
    ]
    torch.manual_seed(1)
    module = UPLiFT(channels=8, patch_size=16).train()
    batch = toy_batch()
    f, g = batch.features, {name: batch.guide(name) for name in ("s2", "s4", "s8")}

    def steps(source: str, k: int) -> torch.Tensor:  # k steps of UPLiFT, one encoding of that view's guide
        return module(f[source], g[source], tuple(2**k * side for side in f[source].shape[-2:]))

    expected = (
        F.mse_loss(steps("s2", 1), f["s1"])
        + F.mse_loss(steps("s4", 1), f["s2"]) + F.mse_loss(steps("s4", 2), f["s1"])
        + F.mse_loss(steps("s8", 1), f["s4"]) + F.mse_loss(steps("s8", 2), f["s2"]) + F.mse_loss(steps("s8", 3), f["s1"])
    )  # fmt: skip
    loss = UpliftObjective("cosine").loss(module, batch)
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_validation_compares_with_bilinear_at_2x_and_4x():
    module = UPLiFT(channels=8, patch_size=16).eval()
    batch = toy_batch()
    with torch.no_grad():
        sums = UpliftObjective().validation_sums(module, batch)
    objective = UpliftObjective()
    assert len(sums) == len(objective.sums) == 8
    values = dict(zip(objective.sums, sums.tolist(), strict=True))
    bilinear = F.interpolate(batch.features["s4"], size=(8, 8), mode="bilinear", align_corners=False)
    expected = (bilinear - batch.features["s1"]).square().mean(dim=(1, 2, 3)).sum()
    assert values["mse_bilinear_4x"] == pytest.approx(float(expected), rel=1e-5)
    assert objective.validation_metrics(values, 2)["val_mse_bilinear_4x"] == round(float(expected) / 2, 5)


def test_it_is_uplifts_default_and_keeps_its_own_loss():
    assert UPLiFT.capabilities.objective == "uplift" and get_objective("uplift") is UpliftObjective
    with pytest.raises(
        FeatliftError, match="--loss l1: objective uplift trains with its original's own loss"
    ):
        UpliftObjective("l1")


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return save_tiny_weights(tmp_path_factory.mktemp("weights") / "tiny.safetensors")


def steps_of(run: Path) -> list[tuple[int, int, float]]:
    lines = (run / "train_log.jsonl").read_text().splitlines()
    return [(r["epoch"], r["step"], r["loss"]) for r in map(json.loads, lines) if r["type"] == "step"]


def test_trains_from_the_cli_resumes_as_an_uninterrupted_run_and_extracts(tmp_path, weights):
    images = write_image_tree(tmp_path / "imgs", count=3, corrupt=False)

    def train(run: str, *extra: str) -> int:
        args = train_args(images, tmp_path / run, weights, "--upsampler", "uplift", "--image-size", SIZE)
        return main(
            [*args, "--val-fraction", "0.34", "--cache", str(tmp_path / "cache"), "--seed", "1", *extra]
        )

    with one_thread():
        assert train("straight", "--epochs", "2") == 0
        assert train("resumed", "--epochs", "1") == 0
        assert train("resumed", "--epochs", "2", "--resume") == 0
    config = json.loads((tmp_path / "straight" / "config.json").read_text())
    assert config["upsampler"]["name"] == "uplift" and config["training"]["objective_name"] == "uplift"
    straight, resumed = steps_of(tmp_path / "straight"), steps_of(tmp_path / "resumed")
    assert [s[:2] for s in straight] == [s[:2] for s in resumed] and len(straight) == 2
    for (_, _, a), (_, _, b) in zip(straight, resumed, strict=True):
        assert abs(a - b) <= 1e-5
    a, b = (load_file(str(tmp_path / run / "model.safetensors")) for run in ("straight", "resumed"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    assert any(not torch.equal(a[k], UPLiFT(192, 16).state_dict()[k]) for k in a)  # it trained

    # extract with the trained checkpoint: 64 px -> 4x4 tokens, two steps -> 16x16
    argv = ["-q", "extract", str(images), "--backbone", TINY_NAME, "--weights", str(weights)]
    argv += [
        "--upsampler",
        "uplift",
        "--checkpoint",
        str(tmp_path / "straight"),
        "--size",
        "64",
        "--iters",
        "2",
        "--workers",
        "0",
    ]
    with one_thread():
        assert main([*argv, "--out", str(tmp_path / "out"), "--device", "cpu"]) == 0
    outputs = sorted((tmp_path / "out").rglob("*.safetensors"))
    assert len(outputs) == 3
    extracted = load_file(str(outputs[0]))["features"]
    assert extracted.shape == (192, 16, 16)

    from featlift import create_backbone, extract_features
    from featlift.pipeline import FeaturePipeline

    backbone = create_backbone(TINY_NAME, weights=str(weights))
    module, _ = load_checkpoint(tmp_path / "straight", backbone=backbone, options={"iters": 2})
    pipeline = FeaturePipeline(backbone, module.eval()).eval()
    direct = extract_features(
        pipeline, [load_image(find_source(images, outputs[0], tmp_path / "out"))], size=64
    )[0]
    torch.testing.assert_close(extracted.float(), direct, atol=1e-4, rtol=1e-4)


def find_source(images: Path, output: Path, out: Path) -> Path:
    """The image that `output` (``DIR/<path relative to the folder>.safetensors``) was extracted from."""
    relative = output.relative_to(out).with_suffix("")
    return images / relative if (images / relative).is_file() else images / relative.with_suffix("")
