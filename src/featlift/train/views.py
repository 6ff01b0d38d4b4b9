"""Views: the images a training objective needs the backbone's features of, declared per objective.

A `View` is a named way of making pixels from a training image, relative to the training size ``S``:

- ``scale``: the square ``S x S`` image resized by this factor (1: ``S``, 0.5: ``S/2``, 2: ``2S``);
- ``crop``: optionally a box ``(top, left, height, width)`` in fractions of that image; the view is the box
  at the scaled size, e.g. ``View("zoom", 2.0, crop=(0, 0, 0.5, 0.5))`` is the top-left quarter at ``S x S``;
- ``draw``: optionally the index k of a deterministic augmentation: the pixels are photometrically jittered
  (`featlift.train.augment.color_jitter`) with a seed drawn from (training seed, image, k), so the
  backbone's features of draw k are the same every epoch and can be cached;
- ``pad``: a fraction of the scaled side by which the scaled image is reflect-padded on every side before the
  crop (as ``F.pad(mode="reflect")``), so a crop may reach ``-pad .. 1 + pad``: FeatUp's padded jitters;
- ``flip``: the view mirrored left-right after the crop.

A FeatUp jitter (pad, zoom ``z``, crop at an offset, flip) is ``View(name, scale=z, pad=p, crop=(top, left,
1/z, 1/z), flip=...)``: the ``S x S`` window of the padded image enlarged ``z`` times
(`featlift.train.augment.jitter_features` applies the same jitter to a feature map).

Every view is resized from the original image once (`featlift.train.data.resized_uint8`, the resize of
`featlift extract`), cropped on whole pixels, and rounded to uint8. The feature cache stores one tensor per
view, under the view's name.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import torch

from ..errors import FeatliftError
from .augment import color_jitter
from .data import TrainImage, read_pixels, resized_uint8

RESIZE_METHOD = "upright-rgb8-torch-bicubic-aa-once"
SIZE_SEARCH_LIMIT = 1 << 16  # the largest image size tried when suggesting one that fits all views


@dataclass(frozen=True)
class View:
    """One image an objective needs features of; see the module docstring."""

    name: str
    scale: float = 1.0
    crop: tuple[float, float, float, float] | None = None
    draw: int | None = None
    pad: float = 0.0
    flip: bool = False

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.name):
            raise ValueError(f"View name {self.name!r}: expected letters, digits and _ (a cache tensor name)")
        if not self.scale > 0:
            raise ValueError(f"View {self.name}: scale must be > 0, got {self.scale}")
        if self.crop is not None:
            top, left, height, width = self.crop
            low, high = -self.pad, 1 + self.pad
            if not (
                low <= top
                and low <= left
                and height > 0
                and width > 0
                and top + height <= high
                and left + width <= high
            ):
                where = "[0, 1]" if not self.pad else f"[{low:g}, {high:g}] (pad {self.pad:g})"
                raise ValueError(
                    f"View {self.name}: crop {self.crop} is no (top, left, height, width) box in {where}"
                )
        if self.draw is not None and self.draw < 0:
            raise ValueError(f"View {self.name}: draw must be >= 0, got {self.draw}")
        if not 0 <= self.pad < 1:
            raise ValueError(f"View {self.name}: pad must be in [0, 1) of the scaled side, got {self.pad}")

    def describe(self) -> str:
        text = f"{self.name}@{self.scale:g}"
        if self.crop is not None:
            text += "[" + ",".join(f"{c:g}" for c in self.crop) + "]"
        if self.draw is not None:
            text += f"#{self.draw}"
        if self.pad:
            text += f"+pad{self.pad:g}"
        if self.flip:
            text += "~flip"
        return text

    def pixel_box(self, image_size: int) -> tuple[float, float, float, float, float]:
        """(scaled image side, top, left, height, width) in pixels of the scaled (unpadded) image, whole numbers
        when `image_size` fits; top and left are negative for a crop into the padding."""
        side = self.scale * image_size
        top, left, height, width = self.crop or (0.0, 0.0, 1.0, 1.0)
        return side, top * side, left * side, height * side, width * side

    def pad_pixels(self, image_size: int) -> float:
        """The reflect padding of the scaled image in pixels; a whole number when `image_size` fits."""
        return self.pad * self.scale * image_size


def views_signature(views: tuple[View, ...], seed: int) -> str:
    """What the cached features of `views` depend on besides backbone and size: the views and, when any view
    is an augmentation draw, the seed its draws come from."""
    text = ";".join(view.describe() for view in views)
    if any(view.draw is not None for view in views):
        text += f";seed{seed}"
    return text


def check_views(views: tuple[View, ...], owner: str) -> None:
    if not views:
        raise FeatliftError(f"{owner} declares no views")
    names = [view.name for view in views]
    if len(set(names)) != len(names):
        raise FeatliftError(f"{owner}: view names must differ, got {', '.join(names)}")


def _fits(views: tuple[View, ...], image_size: int, patch_size: int) -> bool:
    for view in views:
        side, top, left, height, width = view.pixel_box(image_size)
        pad = view.pad_pixels(image_size)
        if any(abs(x - round(x)) > 1e-6 for x in (side, top, left, height, width, pad)):
            return False
        if pad and round(pad) >= round(side):
            return False  # reflect padding needs fewer pixels than the image has
        if round(height) < patch_size or round(height) % patch_size or round(width) % patch_size:
            return False
    return True


def check_view_sizes(views: tuple[View, ...], image_size: int, patch_size: int, objective: str) -> None:
    """Every view of `objective` at `image_size` must be whole pixels and a whole number of patches."""
    if _fits(views, image_size, patch_size):
        return
    described = ", ".join(view.describe() for view in views)
    step = next((s for s in range(1, SIZE_SEARCH_LIMIT) if _fits(views, s, patch_size)), None)
    hint = f"and no size up to {SIZE_SEARCH_LIMIT} fits them"
    if step is not None:
        low = max(step, image_size // step * step)
        hint = f"so the size must be a multiple of {step} (e.g. {low} or {low + step})"
    raise FeatliftError(
        f"--image-size {image_size}: with patch size {patch_size} the views of objective {objective} "
        f"({described}) must all be whole multiples of {patch_size} pixels, {hint}"
    )


def draw_seed(seed: int, digest: str, draw: int) -> int:
    """The jitter seed of augmentation draw `draw` of the image with SHA-256 `digest`."""
    return int(hashlib.sha256(f"{seed}/{digest}/{draw}".encode()).hexdigest()[:15], 16)


def reflect_pad_uint8(image: torch.Tensor, pad: int) -> torch.Tensor:
    """uint8 ``[3, h, w]`` reflect-padded by `pad` pixels on every side (the edge pixel not repeated)."""
    padded = torch.nn.functional.pad(image[None].float(), [pad] * 4, mode="reflect")[0]
    return padded.to(torch.uint8)


def load_views(
    image: TrainImage, views: tuple[View, ...], image_size: int, seed: int
) -> dict[str, torch.Tensor]:
    """The pixels of every view of `image`: view name -> uint8 ``[3, h, w]``."""
    pixels = read_pixels(image)
    resized: dict[int, torch.Tensor] = {}
    out = {}
    for view in views:
        side, top, left, height, width = (round(x) for x in view.pixel_box(image_size))
        if side not in resized:
            resized[side] = resized_uint8(pixels, side)
        scaled, pad = resized[side], round(view.pad_pixels(image_size))
        if pad:
            scaled = reflect_pad_uint8(scaled, pad)
        crop = scaled[:, top + pad : top + pad + height, left + pad : left + pad + width]
        if view.flip:
            crop = crop.flip(-1)
        if view.draw is not None:
            jittered = color_jitter(crop.float().div(255.0), draw_seed(seed, image.digest, view.draw))
            crop = jittered.mul_(255.0).round_().to(torch.uint8)
        out[view.name] = crop.contiguous()
    return out
