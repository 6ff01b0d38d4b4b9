"""Reading image files, finding them in folders, and turning them into model-ready tensors."""

from __future__ import annotations

import glob
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import FeatliftError, ImageReadError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".jfif"}
)


def is_image_file(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


ALPHA_BACKGROUND = (255, 255, 255)  # transparent pixels are shown over white, as on a web page
_ORIENTATION = 0x0112  # the EXIF tag `ImageOps.exif_transpose` reads


def load_image(path: str | os.PathLike, data: bytes | None = None) -> Image.Image:
    """Open and fully decode an image as upright 8-bit RGB (`rgb_image`); else `ImageReadError` naming the file.

    `data` is the file's content when the caller has read it already (training hashes it); `path` then
    only names the file in errors.
    """
    path = Path(path)
    try:
        with Image.open(io.BytesIO(data) if data is not None else path) as img:
            img.load()
            return rgb_image(img)
    except FileNotFoundError:
        raise ImageReadError(f"{path}: no such file") from None
    except ImageReadError as exc:
        raise ImageReadError(f"{path}: {exc}") from None
    except UnidentifiedImageError:  # its message names the stream (e.g. a BytesIO), not the file
        raise ImageReadError(
            f"{path}: cannot decode image (not an image format Pillow can identify)"
        ) from None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageReadError(f"{path}: cannot decode image ({exc})") from exc


def rgb_image(image: Image.Image) -> Image.Image:
    """`image` upright and as 8-bit RGB, the picture an image viewer shows.

    The EXIF orientation is applied (phone photos are stored sideways). Pixel values are rescaled, not
    clipped: 16-bit greyscale (``I;16*``, and ``I``, taken as 16-bit) divides by 257; float (``F``) is
    read in the smallest of the ranges 0-1, 0-255, 0-65535 that holds its pixels. Transparent pixels
    (alpha, or a palette's transparent colour) are composited over `ALPHA_BACKGROUND`. Every other mode
    (``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ...) uses Pillow's own RGB conversion. Returns `image`
    itself when it is already upright RGB.
    """
    if image.getexif().get(_ORIENTATION, 1) not in (0, 1):
        image = ImageOps.exif_transpose(image)
    if image.mode == "RGB":
        return image
    if image.mode == "I" or image.mode.startswith("I;16") or image.mode == "F":
        return Image.fromarray(_grey_to_uint8(np.asarray(image), image.mode)).convert("RGB")
    if image.has_transparency_data:
        background = Image.new("RGBA", image.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def _grey_to_uint8(pixels: np.ndarray, mode: str) -> np.ndarray:
    """16-bit or float greyscale pixels -> uint8, rescaled to 0-255 (see `rgb_image`)."""
    pixels = pixels.astype(np.float64)
    if mode == "F":
        if not np.isfinite(pixels).all():
            raise ImageReadError("float image has NaN or infinite pixels")
        peak = pixels.max(initial=0.0)
        full_scale = 1.0 if peak <= 1.0 else 255.0 if peak <= 255.0 else 65535.0
    else:
        full_scale = 65535.0
    return np.rint(np.clip(pixels, 0.0, full_scale) * (255.0 / full_scale)).astype(np.uint8)


def parse_size(text: str | int | tuple[int, int]) -> tuple[int, int]:
    """`"224"` -> (224, 224); `"224x320"` (height x width) -> (224, 320)."""
    if isinstance(text, int):
        text = str(text)
    if isinstance(text, tuple):
        height, width = text
    else:
        parts = str(text).lower().replace(",", "x").split("x")
        try:
            values = [int(p) for p in parts]
        except ValueError:
            raise FeatliftError(f"size {text!r}: expected S or HxW in pixels, e.g. 224 or 224x336") from None
        if len(values) == 1:
            height = width = values[0]
        elif len(values) == 2:
            height, width = values
        else:
            raise FeatliftError(f"size {text!r}: expected S or HxW in pixels, e.g. 224 or 224x336")
    if height <= 0 or width <= 0:
        raise FeatliftError(f"size {text!r}: height and width must be positive")
    return int(height), int(width)


def image_to_tensor(image: Image.Image, size: tuple[int, int] | None = None) -> torch.Tensor:
    """PIL image -> float tensor [3, H, W] in [0, 1]: 8-bit RGB by `rgb_image`, resized by `resize_images`."""
    array = np.asarray(rgb_image(image), dtype=np.uint8)
    pixels = torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)
    return resize_images(pixels[None], size)[0]


def resize_images(images: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
    """Float images ``[B, 3, H, W]`` in [0, 1] -> ``[B, 3, *size]``: the one resize of featlift.

    Bicubic with antialiasing (torch's, whose filter is PIL's), clamped back to [0, 1]. Every image
    featlift resizes goes through here: files in `featlift extract` and the evaluations, tensors and PIL
    images in `featlift.extract_features`, and each level of the training pyramid. Resizing ignores
    aspect ratio, as the LiFT and DINO evaluation code do; pass a size with the image's own aspect
    ratio to keep it. `size` None or equal to the images' size returns `images` unchanged.
    """
    if size is None or tuple(images.shape[-2:]) == tuple(size):
        return images
    resized = F.interpolate(images, size=tuple(size), mode="bicubic", antialias=True, align_corners=False)
    return resized.clamp_(0.0, 1.0)


@dataclass(frozen=True)
class ImageItem:
    """An input image and the path of its outputs relative to the output folder."""

    path: Path
    relative: Path


def _glob_root(pattern: str) -> Path:
    """The folder part of a glob pattern before its first wildcard."""
    parts = Path(pattern).parts
    static = []
    for part in parts:
        if glob.has_magic(part):
            break
        static.append(part)
    return Path(*static) if static else Path(".")


def _is_image_entry(path: Path) -> bool:
    """An image file, or a symlink named like one whose target is missing or loops.

    Such a symlink is kept so that reading it fails and is reported like any unreadable image,
    instead of being dropped without a word.
    """
    return is_image_file(path) and (path.is_file() or (path.is_symlink() and not path.exists()))


def _relative_inside(path: Path, root: Path, pattern: str) -> Path:
    """`path` relative to `root`, with ``.``/``..`` resolved by name; an error if it leaves `root`.

    A glob with ``..`` after a wildcard (``photos/*/../../x.jpg``) can match files outside its fixed
    folder, and their outputs would be written outside the output folder.
    """
    relative = Path(os.path.relpath(path, root))  # lexical: abspath + normpath of both
    if relative.parts[:1] == ("..",):
        raise FeatliftError(
            f"{pattern}: matches {path}, which is outside the pattern's fixed folder {root}, so its output "
            f"would be written outside the output folder; start the pattern at a folder that holds every match"
        )
    return relative


def collect_images(inputs: list[str | os.PathLike]) -> list[ImageItem]:
    """Expand files, folders (recursive) and glob patterns into a sorted list of image files.

    The relative path of each image is taken from the folder or the glob's fixed prefix it was
    found under; a file named directly keeps only its file name. Two images that would map to
    the same relative path are an error, since their outputs would overwrite each other, and so
    is a glob match outside the glob's fixed folder. Broken or looping symlinks named like images
    are kept, so that reading them fails and is reported.
    """
    items: dict[Path, ImageItem] = {}
    for raw in inputs:
        entry = Path(raw)
        if entry.is_dir():
            found = [(p, p.relative_to(entry)) for p in sorted(entry.rglob("*")) if _is_image_entry(p)]
            if not found:
                raise FeatliftError(
                    f"{entry}: folder contains no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})"
                )
        elif entry.is_file():
            found = [(entry, Path(entry.name))]
        elif glob.has_magic(str(raw)):
            root = _glob_root(str(raw))
            matches = sorted(Path(p) for p in glob.glob(str(raw), recursive=True))
            found = [(p, _relative_inside(p, root, str(raw))) for p in matches if _is_image_entry(p)]
            if not found:
                raise FeatliftError(f"{raw}: pattern matches no image files")
        else:
            raise FeatliftError(f"{raw}: no such file, folder or glob pattern")
        for path, relative in found:
            key = Path(os.path.realpath(path))  # unlike Path.resolve, no error for a symlink loop
            if key in items:
                continue
            items[key] = ImageItem(path=path, relative=relative)
    by_relative: dict[Path, Path] = {}
    for item in items.values():
        other = by_relative.setdefault(item.relative, item.path)
        if other != item.path:
            raise FeatliftError(
                f"{other} and {item.path} would both be written as {item.relative}; pass their common folder instead"
            )
    return sorted(items.values(), key=lambda item: str(item.relative))
