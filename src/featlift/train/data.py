"""Training images: discovery, a deterministic train/validation split, their pixels and the 3-scale pyramid.

Every image is read once up front (`scan_images`): its bytes are hashed (the feature-cache key) and
decoded (`featlift.images.load_image`: EXIF orientation, any mode to 8-bit RGB), so unreadable files are
skipped and counted before any training starts. Each later load (`read_pixels`) decodes it again, and every
size it is used at is resized from the original once (`resized_uint8`) with `featlift.images.resize_images`,
the resize of `featlift extract`: `load_pyramid` gives ``S x S``, ``S/2`` and ``S/4``, `featlift.train.views`
any view an objective declares.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from ..errors import FeatliftError, ImageReadError
from ..images import IMAGE_EXTENSIONS, collect_images, image_to_tensor, load_image, resize_images

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


def _decode(path: Path, data: bytes) -> Image.Image:
    """`load_image` of the bytes `data` read from `path`; any decoder failure becomes an `ImageReadError`."""
    try:
        return load_image(path, data)
    except ImageReadError:
        raise
    except Exception as exc:  # PIL raises many types for broken files
        raise ImageReadError(f"{path}: cannot decode image ({type(exc).__name__}: {exc})") from exc


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
            _decode(item.path, data)
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


def read_pixels(image: TrainImage) -> torch.Tensor:
    """The image file decoded again, as a float tensor ``[1, 3, H, W]`` in [0, 1] at its own size."""
    return image_to_tensor(_decode(image.path, image.path.read_bytes()))[None]


def resized_uint8(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """`read_pixels`'s ``[1, 3, H, W]`` resized to ``size x size`` (aspect ratio not kept, as in LiFT), as uint8
    ``[3, size, size]``."""
    return resize_images(pixels, (size, size))[0].mul_(255.0).round_().to(torch.uint8)


def load_pyramid(image: TrainImage, image_size: int) -> list[torch.Tensor]:
    """The image at ``S``, ``S/2``, ``S/4`` as uint8 tensors ``[3, s, s]``, each resized from the original once."""
    pixels = read_pixels(image)
    return [resized_uint8(pixels, image_size // scale) for scale in SCALES]


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
