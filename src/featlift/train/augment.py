"""Augmentations: the photometric jitter of guide images, and FeatUp's geometric jitter applied to feature maps.

The photometric jitter of the guide image is drawn from a generator seeded per (seed, epoch, step, image).
Like torchvision's ``ColorJitter(0.2, 0.2, 0.2, 0.2)`` (the original LiFT's setting): brightness,
contrast and saturation factors in [0.8, 1.2], hue shift in [-0.2, 0.2] turns, applied in a random
order. It is applied only to the guide image LiFT sees; the backbone features (inputs and targets)
come from the un-jittered image, so they can be cached.

`jitter_features` applies a `featlift.train.views.View`'s geometric jitter (reflect pad, zoom, crop, flip) to a
feature map of the whole image, so that upsampled features can be compared with the backbone's features of the
jittered view (FeatUp's multi-view objective).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torchvision.transforms.functional as TF

if TYPE_CHECKING:
    from .views import View


def jitter_seed(seed: int, epoch: int, step: int, slot: int) -> int:
    return (((seed * 1_000_003 + epoch) * 1_000_033 + step) * 4099 + slot) % (2**63 - 1)


def color_jitter(image: torch.Tensor, seed: int, strength: float = 0.2) -> torch.Tensor:
    """``[3, H, W]`` float image in [0, 1] -> jittered image in [0, 1]; deterministic in `seed`."""
    generator = torch.Generator().manual_seed(seed)
    factors = 1.0 + (torch.rand(3, generator=generator) * 2 - 1) * strength
    hue = float((torch.rand(1, generator=generator) * 2 - 1) * strength)
    order = torch.randperm(4, generator=generator).tolist()
    for op in order:
        if op == 0:
            image = TF.adjust_brightness(image, float(factors[0]))
        elif op == 1:
            image = TF.adjust_contrast(image, float(factors[1]))
        elif op == 2:
            image = TF.adjust_saturation(image, float(factors[2]))
        else:
            image = TF.adjust_hue(image, hue)
    return image.clamp_(0.0, 1.0)


def jitter_features(features: torch.Tensor, view: View) -> torch.Tensor:
    """A feature map of the whole ``S x S`` image jittered as `view` jitters the image (pad, zoom, crop, flip).

    `features` ``[B, C, H, W]`` cover the image; the result has the size of the view's crop mapped to the same
    density (``H x W`` for a FeatUp jitter, whose crop is ``1/scale`` of the scaled side). Output pixel ``u`` of
    the crop reads the reflect-padded map, bilinearly, at ``top * H + (u + 1/2) / scale - 1/2`` (pixel centres):
    exactly FeatUp's ``apply_jitter`` (reflect pad, bilinear zoom, crop, flip) on a map with the image's
    geometry, computed by sampling instead of zooming the padded map first (memory of the output only).
    """
    import torch.nn.functional as F

    height, width = features.shape[-2:]
    top, left, crop_h, crop_w = view.crop or (0.0, 0.0, 1.0, 1.0)
    out_h, out_w = round(crop_h * view.scale * height), round(crop_w * view.scale * width)
    margin_h = min(height - 1, math.ceil(view.pad * height) + 2) if view.pad else 0
    margin_w = min(width - 1, math.ceil(view.pad * width) + 2) if view.pad else 0
    padded = (
        F.pad(features, [margin_w, margin_w, margin_h, margin_h], mode="reflect") if view.pad else features
    )

    def coordinates(start: float, count: int, size: int, margin: int) -> torch.Tensor:
        centres = (
            start * size
            + (torch.arange(count, device=features.device, dtype=features.dtype) + 0.5) / view.scale
        )
        return (centres + margin) / (size + 2 * margin) * 2 - 1  # grid_sample's [-1, 1], align_corners=False

    rows = coordinates(top, out_h, height, margin_h)
    cols = coordinates(left, out_w, width, margin_w)
    grid = torch.stack(torch.broadcast_tensors(cols[None, :], rows[:, None]), dim=-1)
    grid = grid.expand(features.shape[0], out_h, out_w, 2)
    out = F.grid_sample(padded, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.flip(-1) if view.flip else out
