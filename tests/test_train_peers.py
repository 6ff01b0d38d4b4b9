"""`featlift train --upsampler jafar|anyup` from the CLI with each method's own objective (its default), and
``--resume`` continuing as an uninterrupted run. (FeatUp's JBU: tests/test_featup_objective.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import one_thread, save_tiny_weights, train_args, write_image_tree

from featlift import load_checkpoint
from featlift.cli import main

SIZE = {"jafar": "256", "anyup": "64"}  # JAFAR's downscale views need 16 patches at 1/4 of the image


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return save_tiny_weights(tmp_path_factory.mktemp("weights") / "tiny.safetensors")


def steps(run: Path) -> list[tuple[int, int, float]]:
    lines = (run / "train_log.jsonl").read_text().splitlines()
    return [(r["epoch"], r["step"], r["loss"]) for r in map(json.loads, lines) if r["type"] == "step"]


@pytest.mark.parametrize("method", ["jafar", "anyup"])
def test_a_peer_trains_with_its_own_objective_and_resumes_as_an_uninterrupted_run(tmp_path, weights, method):
    images = write_image_tree(tmp_path / "imgs", count=3, corrupt=False)

    def train(run: str, *extra: str) -> int:
        args = train_args(
            images, tmp_path / run, weights, "--upsampler", method, "--image-size", SIZE[method]
        )
        return main(
            [*args, "--val-fraction", "0.34", "--cache", str(tmp_path / "cache"), "--seed", "1", *extra]
        )

    with one_thread():
        assert train("straight", "--epochs", "2") == 0
        assert train("resumed", "--epochs", "1") == 0
        assert train("resumed", "--epochs", "2", "--resume") == 0
    config = json.loads((tmp_path / "straight" / "config.json").read_text())
    assert config["upsampler"]["name"] == method and config["training"]["objective_name"] == method
    straight, resumed = steps(tmp_path / "straight"), steps(tmp_path / "resumed")
    assert [s[:2] for s in straight] == [s[:2] for s in resumed] and len(straight) == 2
    for (_, _, a), (_, _, b) in zip(straight, resumed, strict=True):
        assert abs(a - b) <= 1e-5
    a, b = (load_file(str(tmp_path / run / "model.safetensors")) for run in ("straight", "resumed"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    module, _ = load_checkpoint(tmp_path / "straight")
    assert module.name == method
