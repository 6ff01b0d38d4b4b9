"""Core checks on the real DINOv2 ViT-S/14 and real ImageNet images from ../shared (skipped only without it)."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import DINOV2_NAME, DINOV2_WEIGHTS, IMAGENET_SAMPLE, requires_shared
from test_backbone import hand_block_inputs, hand_facet, to_map

from featlift import CheckpointMismatchError, load_checkpoint
from featlift.backbones import ViTBackbone
from featlift.checkpoint import save_checkpoint
from featlift.cli import main
from featlift.extract import load_features
from featlift.upsamplers import LiFT

pytestmark = [requires_shared, pytest.mark.shared]

REAL_IMAGES = ["n01440764_tench.JPEG", "n01443537_goldfish.JPEG", "n01530575_brambling.JPEG"]


def test_real_backbone_reports_its_shape_from_the_model(dinov2_backbone):
    b = dinov2_backbone
    assert (b.name, b.channels, b.patch_size, b.num_prefix_tokens, b.layer, b.depth) == (
        DINOV2_NAME,
        384,
        14,
        1,
        11,
        12,
    )
    assert b.fingerprint() == "4da5b7fc0899f8b1"  # sha256 of the ../shared weights, stable across runs


@pytest.mark.parametrize("facet", ["key", "query", "value"])
def test_real_attention_facets_match_hand_computation(dinov2_backbone, facet):
    model = dinov2_backbone.model
    x = dinov2_backbone.normalize(torch.rand(1, 3, 112, 168))
    with torch.no_grad():
        inputs, _ = hand_block_inputs(model, x)
        expected = to_map(hand_facet(model.blocks[11], inputs[11], facet), 1, (8, 12))
        got = ViTBackbone(model, DINOV2_NAME, layer=11, facet=facet)(x)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def real_image_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("imagenet")
    names = REAL_IMAGES + [next(p.name for p in sorted(IMAGENET_SAMPLE.iterdir()) if "'" in p.name)]
    for name in names:
        shutil.copy(IMAGENET_SAMPLE / name, folder / name)
    return folder


def run_extract(folder, out, *args):
    argv = [
        "-q",
        "extract",
        str(folder),
        "--backbone",
        DINOV2_NAME,
        "--weights",
        str(DINOV2_WEIGHTS),
        "--size",
        "224",
    ]
    return main([*argv, "--out", str(out), "--workers", "0", *args])


def test_extract_real_images_bilinear_and_lift(tmp_path, real_image_dir, dinov2_backbone):
    assert run_extract(real_image_dir, tmp_path / "bilinear", "--upsampler", "bilinear") == 0
    files = sorted((tmp_path / "bilinear").glob("*.safetensors"))
    assert len(files) == 4
    for file in files:
        features, meta = load_features(file)
        assert features.shape == (384, 32, 32) and torch.isfinite(features).all()
        assert meta["fingerprint"] == "4da5b7fc0899f8b1"

    torch.manual_seed(0)
    save_checkpoint(tmp_path / "ckpt", LiFT(384, 14), dinov2_backbone)
    assert (
        run_extract(
            real_image_dir, tmp_path / "lift2", "--checkpoint", str(tmp_path / "ckpt"), "--iters", "2"
        )
        == 0
    )
    features, meta = load_features(tmp_path / "lift2" / f"{REAL_IMAGES[0]}.safetensors")
    assert features.shape == (384, 64, 64) and meta["upsampler_options"] == '{"iters": 2}'


def test_real_checkpoint_for_another_layer_or_facet_is_refused(
    tmp_path, dinov2_backbone, real_image_dir, capsys
):
    key_backbone = ViTBackbone(dinov2_backbone.model, DINOV2_NAME, layer=11, facet="key")
    save_checkpoint(tmp_path / "ckpt", LiFT(384, 14), key_backbone)
    with pytest.raises(CheckpointMismatchError, match="facet=key .* facet=token"):
        load_checkpoint(tmp_path / "ckpt", backbone=dinov2_backbone)
    assert (
        run_extract(
            real_image_dir,
            tmp_path / "out",
            "--checkpoint",
            str(tmp_path / "ckpt"),
            "--layer",
            "9",
            "--facet",
            "key",
        )
        == 2
    )
    assert "differs in layer" in capsys.readouterr().err


def test_in_memory_features_equal_the_files_extract_writes(tmp_path, real_image_dir, dinov2_backbone):
    """The Python API on PIL images and `featlift extract` on their files: the same features (shipped LiFT)."""
    from featlift import build_pipeline, extract_features
    from featlift.images import load_image

    assert run_extract(real_image_dir, tmp_path / "files") == 0  # default upsampler: the shipped LiFT
    pipeline = build_pipeline(dinov2_backbone, upsampler="lift")
    images = [load_image(real_image_dir / name) for name in REAL_IMAGES]
    in_memory = extract_features(pipeline, images, size=224, batch_size=2)
    for name, features in zip(REAL_IMAGES, in_memory, strict=True):
        written, _ = load_features(tmp_path / "files" / f"{name}.safetensors")
        assert written.shape == features.shape == (384, 32, 32)
        torch.testing.assert_close(
            features, written, atol=1e-4, rtol=1e-4
        )  # extract folds BN: float rounding
