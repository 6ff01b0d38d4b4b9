"""Bilinear interpolation of the feature map: the baseline every learned upsampler must beat."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Upsampler, check_features_and_image
from .registry import register_upsampler


@register_upsampler("bilinear")
class Bilinear(Upsampler):
    """Bilinear upsampling (``align_corners=False``) by ``2**iters`` in one step; the image is unused."""

    def __init__(self, channels: int | None = None, patch_size: int | None = None):
        super().__init__()

    def upsample_once(self, features: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return F.interpolate(features, scale_factor=2, mode="bilinear", align_corners=False)

    def forward(self, features, image, iters: int = 1, output_size=None):
        check_features_and_image(features, image)
        size = (
            tuple(output_size)
            if output_size is not None
            else (features.shape[-2] * 2**iters, features.shape[-1] * 2**iters)
        )
        if tuple(features.shape[-2:]) == size:
            return features
        return F.interpolate(features, size=size, mode="bilinear", align_corners=False)
