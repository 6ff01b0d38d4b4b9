"""Training images: discovery, a deterministic train/validation split, and the 3-scale image pyramid.

Every image is read once up front (`scan_images`): its bytes are hashed (the feature-cache key) and
decoded, so unreadable files are skipped and counted before any training starts. Each later load
resizes the image to ``S x S`` (bicubic, like `featlift extract`) and then to ``S/2`` and ``S/4``
with PIL's antialiased bicubic resize.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import FeatliftError, ImageReadError
from ..images import IMAGE_EXTENSIONS, collect_images

logger = logging.getLogger(__name__)

SCALES = (1, 2, 4)  # full image, img/2, img/4


@dataclass(frozen=True)
class TrainImage:
    """A usable training image: its path, its path relative to the folder, and the SHA-256 of its bytes."""

    path: Path
    relative: str
    digest: str


@dataclass
class ImageScan:
    images: list[TrainImage]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


def _decode(data: bytes, source: Path) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return img.convert("RGB")
    except UnidentifiedImageError:
        # PIL's message would name the in-memory buffer (<_io.BytesIO object at 0x...>), not the file
        raise ImageReadError(
            f"{source}: cannot decode image (not an image format PIL can identify)"
        ) from None
    except Exception as exc:  # PIL raises many types for broken files
        raise ImageReadError(f"{source}: cannot decode image ({exc})") from exc


def scan_images(folder: str | os.PathLike) -> ImageScan:
    """All decodable images under `folder` (recursive, any names), sorted by relative path.

    Raises `FeatliftError` for a missing or image-less folder, or when no image can be decoded.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FeatliftError(f"IMAGES {folder}: not a folder (expected a folder tree of images)")
    try:
        items = collect_images([folder])
    except FeatliftError:
        raise FeatliftError(
            f"IMAGES {folder}: contains no image files (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}, recursively)"
        ) from None
    scan = ImageScan(images=[])
    for item in items:
        try:
            data = item.path.read_bytes()
            _decode(data, item.path)
        except (OSError, ImageReadError) as exc:
            scan.skipped.append((str(item.path), str(exc)))
            logger.warning("skipping unreadable image %s", exc)
            continue
        digest = hashlib.sha256(data).hexdigest()
        scan.images.append(TrainImage(path=item.path, relative=item.relative.as_posix(), digest=digest))
    if not scan.images:
        raise FeatliftError(
            f"IMAGES {folder}: none of its {len(items)} image files could be decoded (first: {scan.skipped[0][1]})"
        )
    return scan


def split_images(
    images: list[TrainImage], val_fraction: float, seed: int
) -> tuple[list[TrainImage], list[TrainImage]]:
    """Deterministic split by (seed, relative file name): the same folder and seed give the same split.

    ``round(n * val_fraction)`` images (at least 1 when the fraction is > 0 and there are 2+ images)
    go to validation; at least one image always stays for training.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise FeatliftError(f"--val-fraction {val_fraction}: expected a number in [0, 1)")
    count = len(images)
    n_val = round(count * val_fraction)
    if val_fraction > 0 and count >= 2:
        n_val = max(1, n_val)
    n_val = min(n_val, count - 1)
    ranked = sorted(images, key=lambda im: hashlib.sha256(f"{seed}/{im.relative}".encode()).hexdigest())
    val = sorted(ranked[:n_val], key=lambda im: im.relative)
    train = sorted(ranked[n_val:], key=lambda im: im.relative)
    return train, val


def check_image_size(image_size: int, patch_size: int) -> None:
    """The full, 1/2 and 1/4 images must all be multiples of the patch size, i.e. S a multiple of 4p."""
    step = 4 * patch_size
    if image_size < step or image_size % step:
        low = max(step, image_size // step * step)
        raise FeatliftError(
            f"--image-size {image_size}: with patch size {patch_size} the image and its 2x and 4x downsamplings must "
            f"all be multiples of {patch_size}, so the size must be a multiple of {step} (e.g. {low} or {low + step})"
        )


def load_pyramid(image: TrainImage, image_size: int) -> list[torch.Tensor]:
    """The image at ``S``, ``S/2``, ``S/4`` as uint8 tensors ``[3, s, s]`` (aspect ratio not kept, as in LiFT)."""
    data = image.path.read_bytes()
    pil = _decode(data, image.path)
    pil = pil.resize((image_size, image_size), Image.BICUBIC)
    out = []
    for scale in SCALES:
        size = image_size // scale
        scaled = pil if scale == 1 else pil.resize((size, size), Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(scaled, dtype=np.uint8).copy()).permute(2, 0, 1))
    return out


def epoch_order(count: int, global_batch: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches of one epoch: a permutation seeded by (seed, epoch), cut into ``global_batch`` indices.

    The last batch is filled up by wrapping round to the start of the permutation, so every step sees
    exactly ``global_batch`` images and DDP ranks always get equal shares.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(count, generator=generator).tolist()
    steps = math.ceil(count / global_batch)
    padded = (order * (1 + steps * global_batch // max(count, 1)))[: steps * global_batch]
    return [padded[i * global_batch : (i + 1) * global_batch] for i in range(steps)]
