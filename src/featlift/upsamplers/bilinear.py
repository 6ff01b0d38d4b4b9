"""Bilinear interpolation of the feature map: the baseline every learned upsampler must beat."""

from __future__ import annotations

import torch

from .base import Capabilities, Upsampler, check_inputs, resize_features
from .registry import register_upsampler


@register_upsampler("bilinear")
class Bilinear(Upsampler):
    """Bilinear upsampling (``align_corners=False``) to any size in one step; no guide.

    Without a requested size it enlarges the grid ``2**iters`` times (default 2x).
    """

    capabilities = Capabilities(guide="none", output_sizes="any", fitting="none")
    options = ("iters",)

    def __init__(self, iters: int = 1):
        super().__init__()
        if iters < 1:
            raise ValueError(f"bilinear iters must be >= 1, got {iters}")
        self.iters = int(iters)

    def config(self):
        return {"iters": self.iters}

    def native_output_size(self, grid: tuple[int, int]) -> tuple[int, int]:
        return grid[0] * 2**self.iters, grid[1] * 2**self.iters

    def forward(
        self, features: torch.Tensor, guide: torch.Tensor | None, output_size: tuple[int, int]
    ) -> torch.Tensor:
        return resize_features(features, check_inputs(features, guide, output_size, needs_guide=False))
