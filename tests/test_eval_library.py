"""The evaluations as library functions: a config and variants in, `TaskResults` out, with no CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fake_variants import PositionFeatures
from PIL import Image

from featlift import FeatliftError
from featlift.evaluate.davis import DavisConfig
from featlift.evaluate.discovery import DiscoveryConfig
from featlift.evaluate.probe import ProbeConfig
from featlift.evaluate.report import write_results
from featlift.evaluate.spair import SpairConfig
from featlift.evaluate.warp import WarpConfig, evaluate_variant, evaluate_warp
from featlift.variants import parse_variants

TASK_MODULES = [
    "davis", "discovery", "probe", "report", "runner", "spair", "warp", "correspondence", "depth", "depth_metrics",
]  # fmt: skip


def test_the_evaluations_import_no_command_line_module():
    modules = ", ".join(f"featlift.evaluate.{name}" for name in TASK_MODULES)
    code = (
        f"import sys, {modules}; print(sorted(m for m in sys.modules if m.startswith('featlift.commands')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def write_photos(folder, count=2, size=(40, 56)):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / f"photo{i}.png")
    return folder


def test_warp_runs_from_a_config_and_writes_its_results(tiny_backbone, tmp_path):
    variants = parse_variants(["none", "bilinear"], tiny_backbone(patch_size=16))
    config = WarpConfig(data=str(write_photos(tmp_path / "photos")), size=(32, 48), keypoints=4, seed=1)
    seen = []
    results = evaluate_warp(config, variants, on_result=seen.append)
    assert results.task == "warp" and [row.variant for row in results.rows] == ["none", "bilinear"]
    assert seen == results.rows
    assert results.metric_names == ["PCK@0.1", "PCK@0.05", "PCK@0.01"]
    settings = results.settings
    assert settings["images"] == 2 and settings["base_size"] == [32, 48] and settings["device"] == "cpu"
    assert settings["weights"] is None and settings["seed"] == 1
    assert [v["feature_grid"] for v in settings["variants"]] == [[2, 3], [4, 6]]
    for row in results.rows:
        assert row.details["homography_keypoints"] > 0 and 0 <= row.metrics["PCK@0.1"] <= 100
    write_results(tmp_path / "out", results)
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert written["task"] == "warp" and written["settings"] == json.loads(json.dumps(settings))
    assert "| `bilinear` |" in (tmp_path / "out" / "results.md").read_text()


@pytest.mark.parametrize(
    ("build", "field", "expected"),
    [
        (lambda: WarpConfig(data="x", strength=0.5), "WarpConfig.strength = 0.5", "< 0.5"),
        (lambda: WarpConfig(data="x", keypoints=0), "WarpConfig.keypoints = 0", ">= 1"),
        (lambda: WarpConfig(data="x", size=(0, 32)), "WarpConfig.size = (0, 32)", "two integers"),
        (lambda: DavisConfig(data="x", max_frames=1), "DavisConfig.max_frames = 1", ">= 2 or None"),
        (lambda: DavisConfig(data="x", temperature=float("nan")), "DavisConfig.temperature", "finite"),
        (lambda: DavisConfig(data="x", year=2018), "DavisConfig.year = 2018", "2016, 2017"),
        (lambda: ProbeConfig(data="x", format="coco"), "ProbeConfig.format = 'coco'", "camvid"),
        (lambda: ProbeConfig(data="x", format="voc", lr=0), "ProbeConfig.lr = 0", "> 0"),
        (lambda: SpairConfig(data="x", split="train"), "SpairConfig.split = 'train'", "trn, val, test"),
        (lambda: DiscoveryConfig(data="x", format="voc07", eps=1.0), "DiscoveryConfig.eps = 1.0", "< 1"),
    ],
)
def test_configs_refuse_bad_fields_naming_them(build, field, expected):
    with pytest.raises(FeatliftError) as refused:
        build()
    message = str(refused.value)
    assert message.startswith(field) and "expected" in message and expected in message


class SourceGuidedPositions(PositionFeatures):
    """Position features from a method that says it is guided by the source images; it records them."""

    label = "source-guided"

    def __init__(self, cell: int = 8):
        super().__init__(cell)
        self.pipeline.upsampler = SimpleNamespace(capabilities=SimpleNamespace(guide="source"))
        self.pipeline.wants_sources = True  # as FeaturePipeline says for guide "source"
        self.sources = []

    def __call__(self, images: torch.Tensor, sources=None) -> torch.Tensor:
        self.sources.append(None if sources is None else [tuple(s.shape) for s in sources])
        return super().__call__(images)


def test_methods_guided_by_the_source_get_the_images_before_resizing(tmp_path):
    photos = write_photos(tmp_path / "photos", count=1, size=(40, 56))
    variant = SourceGuidedPositions(cell=8)
    evaluate_variant(variant, sorted(photos.iterdir()), (32, 32), keypoints=4)
    # the source and its warp, at the decoded size (H 40, W 56), not the 32x32 input
    assert variant.sources and all(s is not None and set(s) == {(3, 40, 56)} for s in variant.sources)
    plain = PositionFeatures(cell=8)
    evaluate_variant(plain, sorted(photos.iterdir()), (32, 32), keypoints=4)  # called with images only
