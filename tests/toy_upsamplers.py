"""Upsamplers registered outside featlift, as a user's module would: tests drive every command with them.

- ``toy-stretch``: a 1x1 convolution, then the grid stretched ``factor`` times (an option of its own);
- ``toy-guide-recorder``: guided by the image at the output size (``guide="output"``); it records every
  guide it is given in ``GuideRecorder.seen``, so a test can check where the guide's pixels came from.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from featlift.upsamplers import Upsampler, register_upsampler
from featlift.upsamplers.base import Capabilities, check_inputs, resize_features


@register_upsampler("toy-stretch")
class ToyStretch(Upsampler):
    capabilities = Capabilities(guide="none", fitting="none")
    options = ("factor",)

    def __init__(self, channels: int, factor: int = 2):
        super().__init__()
        self.factor = factor
        self.mix = torch.nn.Conv2d(channels, channels, 1)

    def native_output_size(self, grid):
        return grid[0] * self.factor, grid[1] * self.factor

    def forward(self, features, guide, output_size):
        return resize_features(
            self.mix(features), check_inputs(features, guide, output_size, needs_guide=False)
        )


@register_upsampler("toy-guide-recorder")
class GuideRecorder(Upsampler):
    capabilities = Capabilities(guide="output", fitting="none")
    seen: ClassVar[list[torch.Tensor]] = []  # every guide given, on the CPU

    def forward(self, features, guide, output_size):
        size = check_inputs(features, guide, output_size)
        GuideRecorder.seen.append(guide.detach().float().cpu().clone())
        return resize_features(features, size)


def checkerboard(height: int, width: int) -> torch.Tensor:
    """``[3, H, W]`` pixels alternating black and white every pixel: a resize down and up again loses them."""
    rows, cols = torch.arange(height)[:, None], torch.arange(width)[None, :]
    return ((rows + cols) % 2).float().expand(3, height, width).clone()
