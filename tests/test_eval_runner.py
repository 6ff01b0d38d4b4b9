"""The shared eval plumbing: variant args, timing of the feature computation, layout errors."""

from __future__ import annotations

import argparse

import pytest
import torch
from conftest import write_images

from featlift import FeatliftError
from featlift.commands.eval.arguments import add_eval_args
from featlift.evaluate.runner import (
    FeatureTimer,
    default_variant_specs,
    eval_settings,
    load_batch,
    require_path,
)
from featlift.variants import parse_variants


def test_timer_counts_images_and_returns_features(tiny_backbone):
    backbone = tiny_backbone(patch_size=16)
    (variant,) = parse_variants(["bilinear"], backbone)
    timer = FeatureTimer(variant)
    images = torch.rand(3, 3, 64, 48)
    features = timer(images)
    timer(images[:1])
    assert features.shape == (3, backbone.channels, 8, 6)
    assert timer.images == 4 and timer.seconds > 0
    # the largest call (3 images) holds at least its own output: 3 x 32 channels x 8 x 6 float32
    assert timer.peak_memory_mib >= 3 * 32 * 8 * 6 * 4 / 2**20
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
    settings = eval_settings(variants, args.size, args.device, decode="x")
    grids = {v["spec"]: v["feature_grid"] for v in settings["variants"]}
    assert grids == {"none": [2, 3], "input-2x": [4, 6], "bilinear:iters=2": [8, 12]}
    assert settings["decode"] == "x" and settings["base_size"] == [32, 48]
    assert settings["device"] == "cpu" and settings["weights"] is None  # $FEATLIFT_WEIGHTS is the CLI's


def test_load_batch_and_require_path(tmp_path):
    paths = write_images(tmp_path / "imgs", count=2)
    batch = load_batch(paths, (32, 16))
    assert batch.shape == (2, 3, 32, 16) and 0 <= batch.min() and batch.max() <= 1
    with pytest.raises(FeatliftError, match="missing.png.*expected layout: ROOT/x"):
        require_path(tmp_path / "missing.png", "ROOT/x")


class _AllocatingVariant:
    """A stand-in variant whose call creates one 4 MiB tensor; it records what it saw during each call."""

    label = "allocates-4mib"

    def __init__(self):
        self.calls = []

    def __call__(self, images):
        import threading

        from torch.utils._python_dispatch import _get_current_dispatch_mode

        self.calls.append(
            {"threads": threading.active_count(), "tracked": _get_current_dispatch_mode() is not None}
        )
        return torch.zeros(len(images), 1024, 1024)  # 4 MiB per image (calloc: RSS does not grow)


def test_timer_peak_memory_is_the_live_tensor_peak_and_timing_runs_untracked():
    import threading

    variant = _AllocatingVariant()
    timer = FeatureTimer(variant)
    threads = threading.active_count()
    timer(torch.rand(1, 3, 8, 8))
    timer(torch.rand(1, 3, 8, 8))
    assert timer.peak_memory_mib == 4.0  # exactly the one tensor the call creates
    timer(torch.rand(2, 3, 8, 8))  # a new batch shape is measured too
    assert timer.peak_memory_mib == 8.0 and timer.images == 4
    timed = [call for call in variant.calls if not call["tracked"]]
    assert len(timed) == 3  # every counted call runs without the tracker's per-op overhead
    assert all(call["threads"] == threads for call in variant.calls)  # no sampling thread beside the work
