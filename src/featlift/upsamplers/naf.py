"""NAF (Chambon et al., CVPR 2026, github.com/valeoai/NAF): neighbourhood attention from every output pixel to
a ``9 x 9`` window of the token grid, guided by the image alone, so one module serves every backbone.

For ``C`` feature channels (a multiple of the 4 heads), ``D = dim`` (256) and a guide image ``[B, 3, Hg, Wg]``
(the normalised image the backbone saw):

- guide size: an image more than 4x the output size (either side) is first resized bilinearly to
  ``(min(Hg, 4H, 4W), min(Wg, 4W, 4H))``, as the official ``ImageEncoder`` does;
- image encoder, two branches of ``D/2`` channels each, concatenated: a conv 3 -> D/2 (1x1 in one branch, 3x3
  in the other; reflect padding, bias), then two `PlainConvBlock`s (GroupNorm(8) - SiLU - conv - GroupNorm(8) -
  SiLU - conv with the branch's kernel; **no** residual connection, as the official ``residual=False``);
- queries: the encoding adaptive-average-pooled to the output size ``H x W``, then rotated by
  `AxialRotaryEmbedding` (DINOv3's RoPE: fixed periods ``100 ** (2j / (d/2))``, 4 heads, pixel-centre
  coordinates in ``[-1, 1]`` per axis; while training, the coordinates are scaled by one factor drawn
  log-uniformly in ``[1/2, 2]``);
- keys: the rotated queries adaptive-average-pooled to the token grid ``h x w``; values: the RAW features;
- attention: `neighbourhood_attention` (4 heads of ``D/4``, scale ``(D/4) ** -0.5``): each output pixel sees the
  ``9 x 9`` tokens of its NATTEN neighbourhood at dilation ``H // h`` on the nearest-exact-resized keys, and
  head ``n`` weights the values' channels ``n*C/4 .. (n+1)*C/4`` (the heads are not averaged).

662,528 parameters (the official count; none depends on ``C``); the RoPE periods are a buffer.

Differences from the official code, none in what is computed at inference:

- no NATTEN: the neighbourhood attention is gathered and batched in pure PyTorch, in chunks of output rows
  (options ``chunk_size`` in output pixels, rounded down to whole rows, at least one; ``max_memory_mib``); the
  queries exist for one chunk of rows at a time (the keys are pooled from them in a first pass over the rows:
  columns first, into a ``[B, D, H, w]`` map, then rows), where the official code holds the ``[B, D, H, W]``
  encoding and the nearest-exact-resized ``[B, D + C, H, W]`` keys and values;
- a kernel larger than the grid allows (NATTEN refuses ``9 x H // h > H``, e.g. fewer than 9 tokens) shrinks to
  it, and an output smaller than the grid uses dilation 1 (the official dilation would be 0);
- the training rescale of the RoPE coordinates is drawn at every forward; the official ``RoPE`` caches its
  coordinates per map size, so in a training run at one size it draws the factor once, at the first step;
- ``output_dtype`` allocates the output in another dtype (each chunk is computed in the features' dtype).

Native output size (no size asked): the guide image's size, ``grid x patch_size``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputSizeError
from .attention_blocks import GROUPS
from .base import Capabilities, Upsampler, check_inputs
from .chunking import CHUNK_OPTIONS, DEFAULT_MAX_MEMORY_MIB, chunk_slices, set_chunking
from .chunking import output_dtype as resolve_output_dtype
from .neighbourhood_attention import (
    AxisRuns,
    axis_windows,
    bytes_per_pixel,
    chunk_rows,
    common_run_length,
    neighbourhood_attention,
    window_bytes,
)
from .registry import register_upsampler

GUIDE_LIMIT = 4
"""A guide larger than this many times the output size (either side) is resized down first."""


def pooling_bins(length: int, size: int, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The input bins ``[first, last)`` of ``adaptive_avg_pool`` outputs ``start:stop`` (`length` inputs to
    `size` outputs): ``[floor(i L / size), ceil((i + 1) L / size))``."""
    index = torch.arange(start, stop)
    return (index * length) // size, -((-(index + 1) * length) // size)


def bin_means(x: torch.Tensor, dim: int, first: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """The mean of `x` along `dim` over each bin ``[first, last)`` (indices into `x`), summed tap by tap."""
    count = (last - first).to(x.device)
    first, last = first.to(x.device), last.to(x.device)
    shape = [1] * x.ndim
    shape[dim] = len(count)
    total = None
    for tap in range(int(count.max())):
        taps = torch.minimum(first + tap, last - 1)
        taken = x[(slice(None),) * dim + (taps,)]  # indexing: faster than index_select on the last dim
        if tap:
            taken = taken * (tap < count).view(shape).to(x.dtype)
        total = taken if total is None else total.add_(taken)
    return total.div_(count.view(shape).to(x.dtype))


def pooled_rows(x: torch.Tensor, size: tuple[int, int], start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of ``F.adaptive_avg_pool2d(x, size)``, ``[B, C, stop - start, size[1]]``: the band's
    input rows, pooled along the columns and the rows in the order that pools fewer values first (equal, as
    every bin is a rectangle)."""
    height, width = x.shape[-2:]
    first, last = pooling_bins(height, size[0], start, stop)
    low, high = int(first[0]), int(last[-1])
    band = x[:, :, low:high]
    columns = pooling_bins(width, size[1], 0, size[1])
    if high - low < stop - start:  # fewer input rows than output rows: columns first
        return bin_means(bin_means(band, 3, *columns), 2, first - low, last - low)
    return bin_means(bin_means(band, 2, first - low, last - low), 3, *columns)


class PlainConvBlock(nn.Module):
    """GroupNorm(8) - SiLU - conv - GroupNorm(8) - SiLU - conv, ``kernel_size`` convs with reflect padding and
    bias, channels kept; no residual connection."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(GROUPS, channels)
        self.conv1 = nn.Conv2d(
            channels, channels, kernel_size, padding=kernel_size // 2, padding_mode="reflect"
        )
        self.norm2 = nn.GroupNorm(GROUPS, channels)
        self.conv2 = nn.Conv2d(
            channels, channels, kernel_size, padding=kernel_size // 2, padding_mode="reflect"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))


def image_branch(channels: int, kernel_size: int, blocks: int) -> nn.Sequential:
    """A conv 3 -> `channels` (reflect padding, bias) and `blocks` `PlainConvBlock`s, all with `kernel_size`."""
    stem = nn.Conv2d(3, channels, kernel_size, padding=kernel_size // 2, padding_mode="reflect")
    return nn.Sequential(stem, *(PlainConvBlock(channels, kernel_size) for _ in range(blocks)))


class AxialRotaryEmbedding(nn.Module):
    """DINOv3's rotary embedding as NAF applies it to its ``[B, D, H, W]`` encoding, a band of rows at a time.

    Each head's ``d = D / heads`` channels rotate in pairs ``(x_i, x_{i + d/2})``; the angle of channel ``i``
    (``i < d/2``) is ``2 pi y / period[i]`` for the row coordinate ``y`` when ``i < d/4``, and
    ``2 pi x / period[i - d/4]`` for the column coordinate otherwise, with ``period[j] = base ** (2j / (d/2))``
    and coordinates at the pixel centres, ``2 (k + 0.5) / size - 1`` along each axis.
    """

    def __init__(self, dim: int, heads: int, base: float = 100.0, rescale: float | None = 2.0):
        super().__init__()
        if dim % (4 * heads):
            raise ValueError(f"NAF dim must be a multiple of 4 x rope_heads = {4 * heads}, got {dim}")
        if not base > 0:
            raise ValueError(f"NAF rope_base must be > 0, got {base}")
        if rescale is not None and not rescale >= 1:
            raise ValueError(
                f"NAF rope_rescale must be >= 1 (or None: no rescale while training), got {rescale}"
            )
        self.heads = int(heads)
        self.head_dim = dim // heads
        self.base = float(base)
        self.rescale = None if rescale is None else float(rescale)
        quarter = self.head_dim // 4
        periods = self.base ** (2 * torch.arange(quarter, dtype=torch.float32) / (self.head_dim // 2))
        self.register_buffer("periods", periods, persistent=False)

    def draw_scale(self) -> float:
        """The coordinate scale of one training forward: log-uniform in ``[1/rescale, rescale]`` (torch's
        generator); 1 in eval mode or without a rescale."""
        if not self.training or self.rescale is None or self.rescale == 1:
            return 1.0
        log_max = math.log(self.rescale)
        return float(torch.empty(1).uniform_(-log_max, log_max).exp())

    def forward(
        self, x: torch.Tensor, first_row: int, size: tuple[int, int], coordinate_scale: float = 1.0
    ) -> torch.Tensor:
        """Rows ``first_row : first_row + n`` of a ``size`` map, ``x`` ``[B, D, n, W]``, rotated."""
        batch, dim, rows, width = x.shape
        device = x.device

        def angles(positions: torch.Tensor, length: int) -> torch.Tensor:  # [d/4, len(positions)]
            coordinates = (2.0 * (positions.float() + 0.5) / length - 1.0) * coordinate_scale
            return 2 * math.pi * coordinates[None, :] / self.periods[:, None]

        row_angles = angles(torch.arange(first_row, first_row + rows, device=device), size[0])
        column_angles = angles(torch.arange(width, device=device), size[1])
        quarter = self.head_dim // 4
        half = torch.cat(
            [
                row_angles[:, :, None].expand(quarter, rows, width),
                column_angles[:, None, :].expand(quarter, rows, width),
            ]
        )
        cos, sin = half.cos().to(x.dtype), half.sin().to(x.dtype)  # a channel and its pair share the angle
        heads = x.view(batch, self.heads, self.head_dim, rows, width)
        first, second = heads.chunk(2, dim=2)
        rotated = torch.cat(
            [torch.addcmul(first * cos, second, sin, value=-1), torch.addcmul(second * cos, first, sin)],
            dim=2,
        )
        return rotated.view(batch, dim, rows, width)


@register_upsampler("naf")
class NAF(Upsampler):
    """NAF (see the module doc); takes features of any channel count divisible by ``attention_heads``.

    Example:
        >>> naf = NAF().eval()
        >>> naf(torch.randn(1, 384, 16, 16), torch.randn(1, 3, 224, 224), (448, 448)).shape
        torch.Size([1, 384, 448, 448])
    """

    capabilities = Capabilities(guide="input", output_sizes="any", objective="naf", backbones="any")
    options = (*CHUNK_OPTIONS, "output_dtype")

    def __init__(
        self,
        dim: int = 256,
        attention_heads: int = 4,
        rope_heads: int = 4,
        kernel_size: int = 9,
        rope_base: float = 100.0,
        rope_rescale: float | None = 2.0,
        encoder_blocks: int = 2,
        patch_size: int = 14,
        chunk_size: int | None = None,
        max_memory_mib: float | None = None,
        output_dtype: str | None = None,
    ):
        super().__init__()
        if dim < 16 or dim % 16:
            raise ValueError(
                f"NAF dim must be a positive multiple of 16 (two branches of GroupNorm(8)), got {dim}"
            )
        if attention_heads < 1 or dim % attention_heads:
            raise ValueError(f"NAF attention_heads must divide dim {dim}, got {attention_heads}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"NAF kernel_size must be odd and >= 1 (9 in the paper), got {kernel_size}")
        if encoder_blocks < 0:
            raise ValueError(f"NAF encoder_blocks must be >= 0 (2 in the paper), got {encoder_blocks}")
        if patch_size < 1:
            raise ValueError(f"NAF patch_size must be >= 1, got {patch_size}")
        set_chunking(self, "NAF", chunk_size, max_memory_mib, output_dtype)
        self.dim = int(dim)
        self.attention_heads = int(attention_heads)
        self.kernel_size = int(kernel_size)
        self.encoder_blocks = int(encoder_blocks)
        self.patch_size = int(patch_size)
        self.pixel_branch = image_branch(dim // 2, 1, encoder_blocks)
        self.context_branch = image_branch(dim // 2, 3, encoder_blocks)
        self.rotary = AxialRotaryEmbedding(dim, rope_heads, rope_base, rope_rescale)

    @classmethod
    def from_features(cls, channels: int, patch_size: int, **args: Any) -> NAF:
        """Any `channels` (divisible by the heads): the weights do not depend on them."""
        return cls(patch_size=patch_size, **args)

    def config(self) -> dict[str, Any]:
        return {
            "dim": self.dim,
            "attention_heads": self.attention_heads,
            "rope_heads": self.rotary.heads,
            "kernel_size": self.kernel_size,
            "rope_base": self.rotary.base,
            "rope_rescale": self.rotary.rescale,
            "encoder_blocks": self.encoder_blocks,
            "patch_size": self.patch_size,
        }

    def native_output_size(self, grid: tuple[int, int]) -> tuple[int, int]:
        """The guide image's size, ``grid x patch_size``."""
        return grid[0] * self.patch_size, grid[1] * self.patch_size

    @staticmethod
    def fit_guide(guide: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """`guide` resized bilinearly as the official encoder does when it exceeds 4x the output size."""
        height, width = guide.shape[-2:]
        if height <= GUIDE_LIMIT * size[0] and width <= GUIDE_LIMIT * size[1]:
            return guide
        limit = (GUIDE_LIMIT * size[0], GUIDE_LIMIT * size[1])
        target = (min(height, *limit), min(width, *limit))
        return F.interpolate(guide, size=target, mode="bilinear", align_corners=False)

    def encode(self, guide: torch.Tensor) -> torch.Tensor:
        """``[B, D, Hg, Wg]``: the two branches' encodings of the guide, concatenated."""
        return torch.cat([self.pixel_branch(guide), self.context_branch(guide)], dim=1)

    def rows_per_chunk(
        self, size: tuple[int, int], grid: tuple[int, int], channels: int, element: int
    ) -> int:
        """Output rows per chunk: ``chunk_size`` pixels in whole rows, or what ``max_memory_mib`` holds."""
        if self.chunk_size is not None:
            return max(1, self.chunk_size // size[1])
        heads = self.attention_heads
        key_dim, value_dim = self.dim // heads, channels // heads
        windows = [axis_windows(s, g, self.kernel_size) for s, g in zip(size, grid, strict=True)]
        rows, columns = (AxisRuns(w, common_run_length(w)) for w in windows)
        keys = rows.windows.shape[1] * columns.windows.shape[1]
        # the query path: pooled rows, their rotation and its temporaries, the rotation's cos and sin
        query_path = element * (5 * self.dim + 2 * self.rotary.head_dim)
        per_pixel = query_path + bytes_per_pixel(heads, key_dim, value_dim, keys, element)
        per_run = window_bytes(heads, key_dim, value_dim, keys, columns.windows.shape[0], element)
        budget = (DEFAULT_MAX_MEMORY_MIB if self.max_memory_mib is None else self.max_memory_mib) * 2**20
        return chunk_rows(size[1], per_pixel, per_run, rows.longest, budget)

    def forward(
        self, features: torch.Tensor, guide: torch.Tensor | None, output_size: tuple[int, int]
    ) -> torch.Tensor:
        size = check_inputs(features, guide, output_size)
        batch, channels, height, width = features.shape
        heads = self.attention_heads
        if channels % heads:
            raise InputSizeError(
                f"features: NAF splits the {channels} channels over its {heads} attention heads, so the "
                f"channel count must be a multiple of {heads}"
            )
        encoded = self.encode(self.fit_guide(guide.to(features.dtype), size))
        scale = self.rotary.draw_scale()  # one draw for queries and keys

        def rotated_rows(start: int, stop: int) -> torch.Tensor:  # [B, D, stop - start, W]
            return self.rotary(pooled_rows(encoded, size, start, stop), start, size, scale)

        rows = self.rows_per_chunk(size, (height, width), channels, features.element_size())
        # keys: the rotated query map pooled to the grid, columns first (exact: the bins are rectangles)
        column_pooled = features.new_empty(batch, self.dim, size[0], width)
        for band in chunk_slices(size[0], rows):
            band_rows = rotated_rows(band.start, band.stop)
            column_pooled[:, :, band] = F.adaptive_avg_pool2d(band_rows, (band.stop - band.start, width))
        keys = F.adaptive_avg_pool2d(column_pooled, (height, width))
        del column_pooled
        key_dim, value_dim = self.dim // heads, channels // heads
        keys = keys.view(batch, heads, key_dim, height, width).permute(0, 1, 3, 4, 2)
        values = features.view(batch, heads, value_dim, height, width).permute(0, 1, 3, 4, 2)

        def queries(start: int, stop: int) -> torch.Tensor:  # [B, heads, stop - start, W, key_dim]
            rotated = rotated_rows(start, stop)
            return rotated.view(batch, heads, key_dim, stop - start, size[1]).permute(0, 1, 3, 4, 2)

        out = features.new_empty(
            batch, channels, *size, dtype=resolve_output_dtype(self.output_dtype, features)
        )
        return neighbourhood_attention(queries, keys, values, out, self.kernel_size, rows)
