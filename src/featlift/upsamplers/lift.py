"""LiFT (Suri et al., ECCV 2024): a small conv module that doubles a ViT's token grid, guided by the image.

Layers, for ``C`` feature channels and a 32-channel image branch:

- image stem: conv3x3/2 (3->32) BN ReLU, conv3x3/2 (32->32) BN ReLU  -> ``H/4``
- adapter: adaptive max-pool to exactly ``2h x 2w`` (identity for patch 8, 2x2 max-pool for
  patch 16 -- the original's choices -- and the same rule for any other patch, e.g. 14)
- image down: conv3x3/2 (32->32) BN ReLU -> ``h x w``
- concat with the features (C+32), ConvTranspose 2x2/2 to ``(C+32)//2``
- concat with the ``2h`` image branch, DoubleConv (conv3x3 BN ReLU, twice) to ``C//2``
- 1x1 conv back to ``C``

``residual=True`` (featlift's addition, off in the paper) adds the bilinear upsampling of the input
features to the output, and zero-initialises the last conv so that an untrained module equals
bilinear. The module then only learns a correction, which trains much faster from few images.

``output_scale`` (featlift's addition) multiplies each pass's output. The cosine loss leaves the scale
of the prediction free, and a trained module inflates feature norms (README, "Output scale"); the
``lift`` objective fits the scale by least squares to the backbone's own 2x features after every epoch.
Cosine-based uses of one pass are unaffected; the features keep the backbone's scale, and a further
pass gets inputs on the scale it was trained on.

Passes: LiFT doubles the grid per pass. ``iters`` fixes the number of passes; left at None, it is the
fewest passes whose grid covers the requested output size (one when none is requested). Pass ``k``
(from 0) is guided by the input image bilinearly enlarged ``2**k`` times, as the original iterative
LiFT does; an output size between two powers of two is a bilinear resize of the larger.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputSizeError
from .base import Capabilities, Upsampler, check_inputs, resize_features
from .registry import register_upsampler

IMAGE_CHANNELS = 32


def conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1, bias: bool = True) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=bias),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


@register_upsampler("lift")
class LiFT(Upsampler):
    """The LiFT module (its parameter counts are in the README).

    Example:
        >>> lift = LiFT(channels=384, patch_size=14)
        >>> lift(torch.randn(1, 384, 16, 16), torch.randn(1, 3, 224, 224), (32, 32)).shape
        torch.Size([1, 384, 32, 32])
    """

    capabilities = Capabilities(guide="input", output_sizes="power-of-two", objective="lift")
    options = ("iters",)

    def __init__(
        self,
        channels: int,
        patch_size: int,
        residual: bool = False,
        output_scale: float = 1.0,
        iters: int | None = None,
    ):
        super().__init__()
        if iters is not None and iters < 1:
            raise ValueError(f"LiFT iters must be >= 1 (or None: from the output size), got {iters}")
        if channels < 2:
            raise ValueError(f"LiFT channels must be >= 2, got {channels}")
        if patch_size < 1:
            raise ValueError(f"LiFT patch_size must be >= 1, got {patch_size}")
        if not (output_scale > 0 and math.isfinite(output_scale)):
            raise ValueError(f"LiFT output_scale must be > 0 and finite, got {output_scale}")
        self.channels = int(channels)
        self.patch_size = int(patch_size)
        self.residual = bool(residual)
        self.output_scale = float(output_scale)
        self.iters = None if iters is None else int(iters)
        merged = channels + IMAGE_CHANNELS
        self.image_stem = nn.Sequential(
            *conv_bn_relu(3, IMAGE_CHANNELS, stride=2),
            *conv_bn_relu(IMAGE_CHANNELS, IMAGE_CHANNELS, stride=2),
        )
        self.image_down = nn.Sequential(*conv_bn_relu(IMAGE_CHANNELS, IMAGE_CHANNELS, stride=2))
        self.up = nn.ConvTranspose2d(merged, merged // 2, kernel_size=2, stride=2)
        self.fuse = nn.Sequential(
            *conv_bn_relu(merged // 2 + IMAGE_CHANNELS, channels // 2, bias=False),
            *conv_bn_relu(channels // 2, channels // 2, bias=False),
        )
        self.head = nn.Conv2d(channels // 2, channels, kernel_size=1)
        if self.residual:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def config(self) -> dict[str, Any]:
        """The arguments that define the weights' function; ``iters`` is a choice of use, not stored."""
        return {
            "channels": self.channels,
            "patch_size": self.patch_size,
            "residual": self.residual,
            "output_scale": self.output_scale,
        }

    def passes_for(self, grid: tuple[int, int], output_size: tuple[int, int] | None) -> int:
        """The number of 2x passes for a token `grid` and a requested `output_size` (see the module doc)."""
        if self.iters is not None:
            return self.iters
        if output_size is None:
            return 1
        passes = 1
        while grid[0] * 2**passes < output_size[0] or grid[1] * 2**passes < output_size[1]:
            passes += 1
        return passes

    def native_output_size(self, grid: tuple[int, int]) -> tuple[int, int]:
        passes = self.passes_for(grid, None)
        return grid[0] * 2**passes, grid[1] * 2**passes

    def forward(
        self, features: torch.Tensor, guide: torch.Tensor | None, output_size: tuple[int, int]
    ) -> torch.Tensor:
        size = check_inputs(features, guide, output_size)
        for step in range(self.passes_for(tuple(features.shape[-2:]), size)):
            enlarged = (
                guide
                if step == 0
                else F.interpolate(guide, scale_factor=2**step, mode="bilinear", align_corners=False)
            )
            features = self.upsample_2x(features, enlarged)
        return resize_features(features, size)

    def upsample_2x(self, features: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """One LiFT pass: ``[B, C, h, w]`` features and their guide image -> ``[B, C, 2h, 2w]``."""
        if features.shape[1] != self.channels:
            raise InputSizeError(
                f"LiFT was built for {self.channels} channels, got features with {features.shape[1]}"
            )
        height, width = features.shape[-2:]
        stem = self.image_stem(image)
        if stem.shape[-2] < 2 * height or stem.shape[-1] < 2 * width:
            raise InputSizeError(
                f"guide image {image.shape[-2]}x{image.shape[-1]} is too small for a {height}x{width} grid: "
                f"LiFT needs at least {8 * height}x{8 * width} pixels"
            )
        fine = F.adaptive_max_pool2d(stem, (2 * height, 2 * width))
        coarse = self.image_down(fine)
        merged = self.up(torch.cat([features, coarse], dim=1))
        out = self.head(self.fuse(torch.cat([merged, fine], dim=1)))
        if self.residual:
            out = out + F.interpolate(features, scale_factor=2, mode="bilinear", align_corners=False)
        if self.output_scale != 1.0:
            out = out * self.output_scale
        return out


# Parameter names of the original LiFT code -> ours, for importing its released .pth files.
ORIGINAL_KEY_PREFIXES = {
    "image_convs_1.": "image_stem.",
    "image_convs_2.": "image_down.",
    "up1.up.": "up.",
    "up1.conv_1.double_conv.": "fuse.",
    "outc.": "head.",
}


def convert_original_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the keys of an original LiFT state dict (``module.`` prefixes allowed) to this module's."""
    converted = {}
    for key, value in state.items():
        if key.startswith("module."):
            key = key[len("module.") :]
        for old, new in ORIGINAL_KEY_PREFIXES.items():
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        converted[key] = value
    return converted
