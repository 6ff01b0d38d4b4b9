"""DySample (Liu et al., ICCV 2023, "Learning to Upsample by Learning to Sample"): upsampling by point sampling.

For low-res features ``x`` ``[B, C, h, w]`` and an integer scale ``s``, every output pixel ``(s*y + a, s*x + b)``
(sub-pixel ``a, b`` in ``0 .. s-1``) of channel group ``g`` (``groups`` groups of ``C / groups`` channels) is the
bilinear sample of group ``g``'s channels of ``x`` at the low-res position

    (x + (2b + 1 - s) / (2s) + dx,  y + (2a + 1 - s) / (2s) + dy)      (pixel centres at integers)

where ``(dx, dy)`` is a learned, content-dependent offset in low-res pixels:

- ``style="lp"`` ("linear then pixel-shuffle"): a 1x1 conv ``C -> 2 * groups * s²`` on ``x`` predicts, per low-res
  pixel, the offsets of its ``s x s`` sub-pixels; offset channel ``d * groups * s² + g * s² + a * s + b`` is
  coordinate ``d`` (0: x, 1: y) of group ``g``'s sub-pixel ``(a, b)``.
- ``style="pl"`` ("pixel-shuffle then linear"): ``x`` is pixel-shuffled to ``[B, C / s², s*h, s*w]`` and a 1x1
  conv ``C / s² -> 2 * groups`` predicts every output pixel's offsets (fewer parameters).
- the offsets are the conv's output times 0.25 (the "static scope": neighbouring sample points cannot cross),
  or, with ``dyscope=True``, times ``0.5 * sigmoid(scope)``, ``scope`` being a second 1x1 conv like the first.

The sample is `torch.nn.functional.grid_sample` with ``align_corners=False`` and ``padding_mode="border"``:
positions beyond the outermost pixel centres take the edge pixel's value. The offset conv's weights start
normal with std 0.001 and its bias at zero; the scope conv starts at zero (sigmoid 0.5, so that it starts
equal to the static 0.25). With zero offsets the output is exactly ``F.interpolate(x, scale_factor=s,
mode="bilinear", align_corners=False)``: the sub-pixel positions above are the ones that interpolation
samples, and its clamping of positions below 0 and above ``h - 1`` is the border padding.

Memory: the output is computed in chunks of low-res rows (the ``s`` output rows each gives), each chunk's
offsets, sampling grid and samples written straight into the output, so the working memory beyond the output
is one chunk's. ``chunk_rows`` fixes the output rows per chunk (rounded down to a multiple of ``s``, at least
``s``); otherwise a chunk holds as many rows as ``max_memory_mib`` (default 512) allows at the estimate of
`DySample.bytes_per_row`. ``output_dtype`` (``float32``, ``float16``, ``bfloat16``; default the features')
is the dtype the output is allocated in. Sampling positions and samples are computed in float32 (float64 for
double features) whatever the features' dtype or autocast: in half precision a position in a 1000-pixel-wide
map would be off by up to half a pixel.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputSizeError
from ..upsamplers.chunking import check_chunking, chunk_length, chunk_slices
from ..upsamplers.chunking import output_dtype as resolve_output_dtype

STYLES = ("lp", "pl")
OFFSET_INIT_STD = 0.001
STATIC_SCOPE = 0.25
DYNAMIC_SCOPE = 0.5


class DySample(nn.Module):
    """DySample as a drop-in module: ``[B, C, h, w] -> [B, C, s*h, s*w]`` (see the module docstring).

    Example:
        >>> op = DySample(64)
        >>> op(torch.randn(2, 64, 4, 7)).shape
        torch.Size([2, 64, 8, 14])
    """

    def __init__(
        self,
        channels: int,
        scale_factor: int = 2,
        style: str = "lp",
        groups: int = 4,
        dyscope: bool = False,
        chunk_rows: int | None = None,
        max_memory_mib: float | None = None,
        output_dtype: str | None = None,
    ):
        super().__init__()
        if isinstance(scale_factor, bool) or int(scale_factor) != scale_factor or scale_factor < 1:
            raise ValueError(f"DySample scale_factor must be an integer >= 1, got {scale_factor!r}")
        if style not in STYLES:
            raise ValueError(f"DySample style {style!r}: expected one of {', '.join(STYLES)}")
        if groups < 1 or channels < 1 or channels % groups:
            raise ValueError(
                f"DySample channels ({channels}) must be a positive multiple of groups ({groups}), groups >= 1"
            )
        scale = int(scale_factor)
        if style == "pl" and channels % (scale * scale):
            raise ValueError(
                f"DySample style 'pl' pixel-shuffles the features: channels ({channels}) must be a multiple of "
                f"scale_factor² ({scale * scale})"
            )
        if chunk_rows is not None and int(chunk_rows) < 1:
            raise ValueError(
                f"DySample chunk_rows must be >= 1 output rows (or None: from the budget), got {chunk_rows}"
            )
        check_chunking("DySample", None, max_memory_mib)
        try:
            resolve_output_dtype(output_dtype, torch.empty(0))
        except ValueError as exc:
            raise ValueError(f"DySample {exc}") from None
        self.channels = int(channels)
        self.scale_factor = scale
        self.style = style
        self.groups = int(groups)
        self.dyscope = bool(dyscope)
        self.chunk_rows = None if chunk_rows is None else int(chunk_rows)
        self.max_memory_mib = None if max_memory_mib is None else float(max_memory_mib)
        self.output_dtype = output_dtype
        predictor_in = channels // (scale * scale) if style == "pl" else channels
        predictor_out = 2 * groups if style == "pl" else 2 * groups * scale * scale
        self.offset = nn.Conv2d(predictor_in, predictor_out, kernel_size=1)
        nn.init.normal_(self.offset.weight, std=OFFSET_INIT_STD)
        nn.init.zeros_(self.offset.bias)
        self.scope = nn.Conv2d(predictor_in, predictor_out, kernel_size=1) if dyscope else None
        if self.scope is not None:
            nn.init.zeros_(self.scope.weight)
            nn.init.zeros_(self.scope.bias)

    def config(self) -> dict[str, Any]:
        """The constructor arguments that define the weights (the chunking is a choice of use)."""
        return {
            "channels": self.channels,
            "scale_factor": self.scale_factor,
            "style": self.style,
            "groups": self.groups,
            "dyscope": self.dyscope,
        }

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config().items())

    def offsets(self, rows: torch.Tensor) -> torch.Tensor:
        """The scaled offsets ``[B, 2 * groups * s², r, w]`` (low-res pixels) of the low-res `rows` ``[B, C, r, w]``."""
        scale = self.scale_factor
        source = F.pixel_shuffle(rows, scale) if self.style == "pl" else rows
        raw = self.offset(source)
        if self.scope is None:
            raw = raw * STATIC_SCOPE
        else:
            raw = raw * self.scope(source).sigmoid() * DYNAMIC_SCOPE
        return F.pixel_unshuffle(raw, scale) if self.style == "pl" else raw

    def sampling_grid(self, offsets: torch.Tensor, first_row: int, height: int) -> torch.Tensor:
        """`grid_sample`'s grid ``[B * groups, s*r, s*w, 2]`` (x, y in [-1, 1], ``align_corners=False``) for the
        `offsets` of the low-res rows ``first_row ..`` of a ``height``-row map.

        Each output pixel samples at its own centre plus its offset: output column ``X = s*x + b`` has its
        centre at ``(X + 0.5) / s`` low-res pixel widths from the left edge, which is the original's low-res
        centre ``x + 0.5`` plus its initial sub-pixel position ``(2b + 1 - s) / (2s)``.
        """
        batch, _, rows, width = offsets.shape
        scale = self.scale_factor
        # [B, 2 * groups * s², r, w] -> [B, 2, groups * s², r, w] -> [B, 2, groups, s*r, s*w]
        shuffled = F.pixel_shuffle(offsets.view(batch, 2, self.groups * scale * scale, rows, width), scale)
        dtype, device = offsets.dtype, offsets.device
        columns = torch.arange(scale * width, device=device, dtype=dtype)
        out_rows = torch.arange(scale * first_row, scale * (first_row + rows), device=device, dtype=dtype)
        centre_x = ((columns + 0.5) / scale).view(1, 1, 1, -1)
        centre_y = ((out_rows + 0.5) / scale).view(1, 1, -1, 1)
        x = (centre_x + shuffled[:, 0]) * (2.0 / width) - 1
        y = (centre_y + shuffled[:, 1]) * (2.0 / height) - 1
        return torch.stack([x, y], dim=-1).view(batch * self.groups, scale * rows, scale * width, 2)

    def bytes_per_row(self, width: int, element_size: int) -> float:
        """Working bytes of one low-res row of a chunk: its ``C * s²`` samples per pixel, the ``C`` features of
        the row band the offset conv reads (a copy: a band of rows is not contiguous; for ``style="pl"`` the
        pixel-shuffled band), and about six (eight with the dynamic scope) tensors of ``2 * groups * s²``
        offset values per pixel (conv outputs, scaled offsets, coordinates, grid)."""
        per_pixel_offsets = 2 * self.groups * self.scale_factor**2
        temporaries = 8 if self.scope is not None else 6
        values = self.channels * (self.scale_factor**2 + 1) + temporaries * per_pixel_offsets
        return float(width * element_size * values)

    def rows_per_chunk(self, height: int, width: int, element_size: int) -> int:
        """Low-res rows per chunk: ``chunk_rows // s`` (at least 1), or as many as ``max_memory_mib`` allows."""
        if self.chunk_rows is not None:
            return max(1, min(height, self.chunk_rows // self.scale_factor))
        return chunk_length(height, self.bytes_per_row(width, element_size), None, self.max_memory_mib)

    def forward(self, features: torch.Tensor, guide: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, C, h, w]`` -> ``[B, C, s*h, s*w]``, in ``output_dtype`` (default: the features' dtype).

        DySample takes no guide (its offsets come from the features alone): a `guide` is refused (ValueError),
        as by the other unguided operator, `featlift.ops.CARAFE`."""
        if guide is not None:
            raise ValueError(
                f"DySample takes no guide (its offsets come from the features alone), got a guide of shape "
                f"{list(guide.shape)}: call it as DySample(features)"
            )
        if not isinstance(features, torch.Tensor) or features.ndim != 4 or features.shape[1] != self.channels:
            shape = list(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise InputSizeError(f"DySample features: expected [B, {self.channels}, h, w], got {shape}")
        if not features.is_floating_point():
            raise InputSizeError(f"DySample features: expected a floating-point tensor, got {features.dtype}")
        batch, channels, height, width = features.shape
        scale = self.scale_factor
        # sampling positions in float32 at least: a half-precision coordinate is off by up to ~w/1000 pixels
        exact = torch.float64 if features.dtype == torch.float64 else torch.float32
        grouped = features.reshape(batch * self.groups, channels // self.groups, height, width).to(exact)
        result_dtype = resolve_output_dtype(self.output_dtype, features)
        step = self.rows_per_chunk(height, width, grouped.element_size())
        out = None
        for rows in chunk_slices(height, step):
            offsets = self.offsets(features[:, :, rows]).to(exact)
            grid = self.sampling_grid(offsets, rows.start, height)
            samples = F.grid_sample(
                grouped, grid, mode="bilinear", padding_mode="border", align_corners=False
            )
            samples = samples.view(batch, channels, scale * (rows.stop - rows.start), scale * width)
            if step >= height:
                return samples.to(result_dtype)
            if out is None:
                out = features.new_empty(batch, channels, scale * height, scale * width, dtype=result_dtype)
            out[:, :, scale * rows.start : scale * rows.stop] = samples
        return out
