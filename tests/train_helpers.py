"""Shared bits of the `featlift train` tests: a tiny named timm ViT saved as a weights file, odd image trees."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

TINY_NAME = "vit_tiny_patch16_224"  # the smallest named timm ViT; random weights, 64 px images -> 4x4 tokens


def save_tiny_weights(path: Path) -> Path:
    torch.manual_seed(0)
    model = timm.create_model(TINY_NAME, pretrained=False, num_classes=0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def write_image_tree(root: Path, count: int = 6, corrupt: bool = True, seed: int = 0) -> Path:
    """Nested folders, names with spaces and apostrophes, jpg/png/webp, plus one corrupt .jpg."""
    rng = np.random.default_rng(seed)
    folders = [root, root / "sub dir", root / "sub dir" / "it's deeper"]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        array = rng.integers(0, 256, size=(40 + 4 * i, 56, 3), dtype=np.uint8)
        ext = (".jpg", ".png", ".webp")[i % 3]
        Image.fromarray(array).save(folders[i % 3] / f"img {i}'s{ext}")
    if corrupt:
        (root / "sub dir" / "broken image.jpg").write_bytes(b"this is not a jpeg")
    return root


def train_args(images: Path, out: Path, weights: Path, *extra: str) -> list[str]:
    return [
        "train",
        str(images),
        "--backbone",
        TINY_NAME,
        "--weights",
        str(weights),
        "--out",
        str(out),
        "--image-size",
        "64",
        "--batch-size",
        "2",
        "--device",
        "cpu",
        "--no-progress",
        *extra,
    ]


@contextlib.contextmanager
def one_thread():
    """Tiny tensors run far faster on one thread on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
