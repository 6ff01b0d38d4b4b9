"""Crops and resizes of the dense maps that the probes score against (label maps, depth maps) and of their images.

Both probes crop the image and its map with the same `centre_square` and shrink the training maps with the same
``nearest-exact`` rule, so that a label never blends two classes and a depth hole stays a hole.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def centre_square(array: torch.Tensor) -> torch.Tensor:
    """The centred square of side ``min(H, W)`` of a ``[..., H, W]`` tensor, at torchvision's ``CenterCrop``
    offsets (``round((H - side) / 2)``; NYUv2's 640x480 -> columns 80..559)."""
    h, w = array.shape[-2:]
    side = min(h, w)
    top, left = int(round((h - side) / 2.0)), int(round((w - side) / 2.0))
    return array[..., top : top + side, left : left + side]


def resize_nearest(array: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``nearest-exact`` resize of a ``[H, W]`` map of any dtype: each output pixel takes the value at the centre
    of the block it covers, where logits upsampled with ``align_corners=False`` put it (legacy ``nearest`` took
    the block's top-left pixel). Returned as is when it already has `size`."""
    if tuple(array.shape) == tuple(size):
        return array
    return F.interpolate(array[None, None].float(), size=size, mode="nearest-exact")[0, 0].to(array.dtype)


def shrink_nearest(array: torch.Tensor, max_side: int) -> torch.Tensor:
    """A ``[H, W]`` map resized by `resize_nearest` to a long side of at most `max_side`, the aspect ratio kept;
    returned as is when it is smaller."""
    h, w = array.shape
    scale = max_side / max(h, w)
    if scale >= 1:
        return array
    return resize_nearest(array, (max(1, round(h * scale)), max(1, round(w * scale))))
