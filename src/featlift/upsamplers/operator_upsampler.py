"""A dynamic upsampling operator (`featlift.ops`) as a featlift upsampler: iterated passes, and an image stem
that stands in for the high-res encoder features the guided operators (SAPA, FADE) expect.

The operators come from decoders where a high-res encoder map sits beside the low-res features. A ViT has no
such map, so the guided ones get `ImageStem`'s features of the image the backbone saw (``guide="input"``),
computed at each pass's output size. The stem (``stem_channels`` = 32 at its widest, like LiFT's image branch):

- the guide image resized (bilinear, antialiased when shrinking) to ``4 x`` the pass's output size;
- conv3x3/2 (3 -> 32) BN ReLU, conv3x3/2 (32 -> 32) BN ReLU: LiFT's two-layer image stem, here landing on
  exactly the output size, so each output pixel's encoder feature sees the 4x4 image pixels it covers and
  their neighbours (receptive field 11 px), whatever the patch size;
- a 1x1 conv (32 -> the operator's guide channels), no BN or ReLU: a signed projection, since FADE's gate mixes
  these encoder features into the output features channel by channel (guide channels = C there).

Passes: an operator multiplies the grid by ``scale`` (default 2); ``iters`` fixes the passes, otherwise the
fewest whose grid covers the requested output size (one when none is asked for), as LiFT's `passes_for`. Every
pass uses the same weights (operator and stem), as iterated LiFT does. An output size between two native
sizes is a bilinear resize of the larger. `upsample_2x` is one pass, what LiFT's 2x objective trains
(``scale=2`` only).

Chunking: ``chunk_size`` (output pixels per chunk, turned into the operator's ``chunk_rows`` at each pass's
output width) or ``max_memory_mib`` (the operator's budget per pass), and ``output_dtype`` (the dtype the
last pass allocates its output in) are options of use, not stored in a checkpoint.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputSizeError
from .base import Upsampler, check_inputs, resize_features
from .chunking import set_chunking

STEM_CHANNELS = 32
STEM_REDUCTION = 4  # the stem's two stride-2 convs


class ImageStem(nn.Module):
    """Encoder features ``[B, out_channels, H, W]`` at any output size ``(H, W)`` from a normalised image."""

    def __init__(self, out_channels: int, channels: int = STEM_CHANNELS):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(3, channels, kernel_size=3, stride=2, padding=1),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=1),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        )
        self.project = nn.Conv2d(channels, out_channels, kernel_size=1)

    def forward(self, image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        target = (STEM_REDUCTION * size[0], STEM_REDUCTION * size[1])
        if tuple(image.shape[-2:]) != target:
            shrinking = target[0] < image.shape[-2] or target[1] < image.shape[-1]
            image = F.interpolate(
                image, size=target, mode="bilinear", align_corners=False, antialias=shrinking
            )
        return self.project(self.layers(image))


class OperatorUpsampler(Upsampler):
    """Base of the upsamplers that wrap one `featlift.ops` operator. A subclass lists the operator's arguments
    in its own constructor, passes them on as ``settings`` (stored in ``config()``), sets ``guided`` (whether
    the operator takes encoder features, then built by `ImageStem`) and implements `build_operator`."""

    options = ("iters", "chunk_size", "max_memory_mib", "output_dtype")
    guided: ClassVar[bool] = False
    label: ClassVar[str] = ""

    def __init__(
        self,
        channels: int,
        scale: int = 2,
        iters: int | None = None,
        chunk_size: int | None = None,
        max_memory_mib: float | None = None,
        output_dtype: str | None = None,
        settings: dict[str, Any] | None = None,
    ):
        super().__init__()
        label = self.label or self.name
        if isinstance(channels, bool) or int(channels) != channels or channels < 1:
            raise ValueError(f"{label} channels must be an integer >= 1, got {channels!r}")
        if isinstance(scale, bool) or int(scale) != scale or scale < 2:
            raise ValueError(f"{label} scale must be an integer >= 2 (the factor of one pass), got {scale!r}")
        if iters is not None and (int(iters) != iters or iters < 1):
            raise ValueError(f"{label} iters must be >= 1 (or None: from the output size), got {iters!r}")
        set_chunking(self, label, chunk_size, max_memory_mib, output_dtype)
        self.channels = int(channels)
        self.scale = int(scale)
        self.iters = None if iters is None else int(iters)
        self.settings = dict(settings or {})
        self.operator = self.build_operator(**self.settings)
        self.stem = ImageStem(self.operator.guide_channels) if self.guided else None

    def build_operator(self, **settings: Any) -> nn.Module:
        """The operator for ``self.channels`` and ``self.scale`` (with ``self.max_memory_mib``) and `settings`."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """``channels``, ``scale`` and the operator's arguments; ``iters`` and the chunking are choices of use."""
        return {
            "channels": self.channels,
            "scale": self.scale,
            **self.settings,
        }

    def passes_for(self, grid: tuple[int, int], output_size: tuple[int, int] | None) -> int:
        """The passes for a token `grid` and a requested `output_size` (see the module docstring)."""
        if self.iters is not None:
            return self.iters
        if output_size is None:
            return 1
        passes = 1
        while grid[0] * self.scale**passes < output_size[0] or grid[1] * self.scale**passes < output_size[1]:
            passes += 1
        return passes

    def native_output_size(self, grid: tuple[int, int]) -> tuple[int, int]:
        factor = self.scale ** self.passes_for(grid, None)
        return grid[0] * factor, grid[1] * factor

    def forward(
        self, features: torch.Tensor, guide: torch.Tensor | None, output_size: tuple[int, int]
    ) -> torch.Tensor:
        size = check_inputs(features, guide, output_size, needs_guide=self.guided)
        passes = self.passes_for(tuple(features.shape[-2:]), size)
        for step in range(passes):
            grid = tuple(s * self.scale for s in features.shape[-2:])
            last = step == passes - 1 and grid == size
            features = self.one_pass(features, guide, self.output_dtype if last else None)
        return resize_features(features, size)

    def upsample_2x(self, features: torch.Tensor, guide: torch.Tensor | None) -> torch.Tensor:
        """One pass ``[B, C, h, w] -> [B, C, 2h, 2w]`` guided by the image `guide` (what LiFT's objective trains)."""
        if self.scale != 2:
            raise ValueError(
                f"{self.label or self.name} with scale={self.scale} has no 2x pass: LiFT's 2x objective trains "
                "scale=2 only"
            )
        return self.one_pass(features, guide, None)

    def one_pass(
        self, features: torch.Tensor, guide: torch.Tensor | None, output_dtype: str | None
    ) -> torch.Tensor:
        """``[B, C, h, w] -> [B, C, s*h, s*w]``: the operator, with the stem's encoder features when guided."""
        if features.ndim != 4 or features.shape[1] != self.channels:
            raise InputSizeError(
                f"{self.label or self.name} was built for {self.channels} channels, got features "
                f"{list(features.shape)}"
            )
        height, width = features.shape[-2:]
        out_size = (self.scale * height, self.scale * width)
        encoder = None
        if self.guided:
            if guide is None:
                raise InputSizeError(f"{self.label or self.name} needs a guide image [B, 3, H, W], got None")
            encoder = self.stem(guide, out_size)
        if self.chunk_size is None and output_dtype is None:
            return self.operator(features, encoder)
        saved = (self.operator.chunk_rows, self.operator.output_dtype)
        if self.chunk_size is not None:  # the operators chunk whole output rows
            self.operator.chunk_rows = max(1, self.chunk_size // out_size[1])
        self.operator.output_dtype = output_dtype
        try:
            return self.operator(features, encoder)
        finally:
            self.operator.chunk_rows, self.operator.output_dtype = saved
