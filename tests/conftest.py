"""Shared fixtures: tiny random ViTs (no download) and the real weights/data in ../shared."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from featlift.backbones import ViTBackbone

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DINOV2_WEIGHTS = SHARED / "weights" / "vit_small_patch14_dinov2.imgfocus.safetensors"
DINOV2_NAME = "vit_small_patch14_dinov2.lvd142m"
IMAGENET_SAMPLE = SHARED / "data" / "imagenet-sample"
DAVIS = SHARED / "data" / "davis2016"
CAMVID = SHARED / "data" / "camvid"

requires_shared = pytest.mark.skipif(
    not DINOV2_WEIGHTS.is_file(), reason=f"real weights not found at {DINOV2_WEIGHTS} (../shared is absent)"
)


@pytest.fixture(autouse=True)
def seeded_random_numbers():
    """Every test starts from the same torch, numpy and random state, so a random draw cannot make it flaky."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


def tiny_vit(
    patch_size: int = 16,
    embed_dim: int = 32,
    depth: int = 2,
    reg_tokens: int = 0,
    qk_norm: bool = False,
    seed: int = 0,
):
    """A random timm VisionTransformer small enough for unit tests, with any patch size."""
    torch.manual_seed(seed)
    return timm.models.vision_transformer.VisionTransformer(
        img_size=patch_size * 4,
        patch_size=patch_size,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=4,
        num_classes=0,
        dynamic_img_size=True,
        reg_tokens=reg_tokens,
        qk_norm=qk_norm,
    ).eval()


@pytest.fixture
def tiny_backbone():
    """Factory: ``tiny_backbone(patch_size=16, facet="token", layer=None, **vit_kwargs)`` -> ViTBackbone."""

    def make(
        patch_size: int = 16,
        facet: str = "token",
        layer: int | None = None,
        name: str | None = None,
        **kwargs,
    ):
        return ViTBackbone(
            tiny_vit(patch_size=patch_size, **kwargs),
            name or f"tiny_vit_p{patch_size}",
            layer=layer,
            facet=facet,
        )

    return make


@pytest.fixture(scope="session")
def dinov2_backbone():
    """The real DINOv2 ViT-S/14 from ../shared (token facet, last block)."""
    if not DINOV2_WEIGHTS.is_file():
        pytest.skip(f"real weights not found at {DINOV2_WEIGHTS} (../shared is absent)")
    from featlift import create_backbone

    return create_backbone(DINOV2_NAME, weights=DINOV2_WEIGHTS)


def write_images(folder: Path, count: int = 3, size: tuple[int, int] = (40, 56), seed: int = 0) -> list[Path]:
    """Write small random RGB JPEG/PNG images into `folder`; returns their paths."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        array = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
        path = folder / (f"img {i}.jpg" if i % 2 == 0 else f"img'{i}.png")
        Image.fromarray(array).save(path)
        paths.append(path)
    return paths


TINY_TIMM_NAME = "vit_tiny_patch16_224"


@pytest.fixture(scope="session")
def tiny_timm_weights(tmp_path_factory) -> Path:
    """A random `vit_tiny_patch16_224` state dict in timm layout, for driving the CLI with `--weights`."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "vit_tiny_random.safetensors"
    save_file(timm.create_model(TINY_TIMM_NAME, pretrained=False).state_dict(), str(path))
    return path
