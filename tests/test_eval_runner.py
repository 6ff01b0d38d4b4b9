"""The shared eval plumbing: variant args, timing of the feature computation, layout errors."""

from __future__ import annotations

import argparse

import pytest
import torch
from conftest import write_images

from featlift import FeatliftError, parse_variants
from featlift.evaluate.runner import (
    FeatureTimer,
    add_eval_args,
    default_variant_specs,
    eval_settings,
    load_batch,
    require_path,
)


def test_timer_counts_images_and_returns_features(tiny_backbone):
    backbone = tiny_backbone(patch_size=16)
    (variant,) = parse_variants(["bilinear"], backbone)
    timer = FeatureTimer(variant)
    images = torch.rand(3, 3, 64, 48)
    features = timer(images)
    timer(images[:1])
    assert features.shape == (3, backbone.channels, 8, 6)
    assert timer.images == 4 and timer.seconds > 0
    row = timer.result({"score": 1})
    assert row.variant == "bilinear" and row.metrics == {"score": 1.0} and row.ms_per_image > 0


def test_defaults_and_settings(tiny_backbone, tmp_path):
    backbone = tiny_backbone(patch_size=16)
    assert default_variant_specs(backbone) == [
        "none",
        "bilinear",
        "input-2x",
    ]  # nothing shipped for a tiny ViT
    parser = argparse.ArgumentParser()
    add_eval_args(parser, default_size=(32, 48))
    args = parser.parse_args(
        ["--variant", "none,input-2x", "--variant", "bilinear:iters=2", "--device", "cpu"]
    )
    variants = parse_variants(args.variant, backbone)
    settings = eval_settings(args, backbone, variants, decode="x")
    grids = {v["spec"]: v["feature_grid"] for v in settings["variants"]}
    assert grids == {"none": [2, 3], "input-2x": [4, 6], "bilinear:iters=2": [8, 12]}
    assert settings["decode"] == "x" and settings["base_size"] == [32, 48]


def test_load_batch_and_require_path(tmp_path):
    paths = write_images(tmp_path / "imgs", count=2)
    batch = load_batch(paths, (32, 16))
    assert batch.shape == (2, 3, 32, 16) and 0 <= batch.min() and batch.max() <= 1
    with pytest.raises(FeatliftError, match="missing.png.*expected layout: ROOT/x"):
        require_path(tmp_path / "missing.png", "ROOT/x")
