"""UPLiFT's Local Attender: each high-resolution pixel is a softmax-weighted mix of a fixed neighbourhood of
low-resolution value features (Walmer et al., CVPR 2026, github.com/mwalmer-umd/UPLiFT ``LocalAttender``).

For values ``V`` ``[B, C, h, w]`` and a guide ``G`` ``[B, G, I*h, I*w]`` (an integer factor ``I``), output pixel
``(y, x)`` is

    out[:, y, x] = sum_d  a_d(y, x) * V[:, clamp(y // I + dy_d), clamp(x // I + dx_d)]
    a(y, x)      = softmax_d( W G[:, y, x] + b + G[:D, y, x] )

over the ``D`` offsets ``(dy_d, dx_d)`` of the neighbourhood (`NEIGHBOURHOODS`), with ``clamp`` keeping the
index inside the value map (the original's replication padding). ``G[:D]`` is the original's residual on its
1x1 conv (the first ``D`` guide channels, zero-padded when the guide has fewer). The weights sum to 1, so each
output pixel is a convex combination of value features, at a cost linear in the output size.

The value map may be given as a band of rows of a taller map (``values_row0``, ``values_height``) and the
guide as a band of output rows (``guide_row0``), so a caller can compute the output in row tiles: the
result is the same rows of the whole map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputSizeError


def _neighbourhood(radius: int, keep) -> tuple[tuple[int, int], ...]:
    """The offsets (dy, dx) within `radius` that `keep` accepts, row by row (the original's order)."""
    span = range(-radius, radius + 1)
    return tuple((dy, dx) for dy in span for dx in span if keep(dy, dx))


NEIGHBOURHOODS: dict[int, tuple[tuple[int, int], ...]] = {
    5: _neighbourhood(1, lambda dy, dx: abs(dy) + abs(dx) <= 1),  # the 4-neighbours and the centre
    9: _neighbourhood(1, lambda dy, dx: True),  # 3x3
    13: _neighbourhood(2, lambda dy, dx: abs(dy) + abs(dx) <= 2),  # the diamond of radius 2
    # 3x3 plus the 8 points two steps away along the rows, columns and diagonals (UPLiFT's default)
    17: _neighbourhood(2, lambda dy, dx: max(abs(dy), abs(dx)) <= 1 or (dy % 2 == 0 and dx % 2 == 0)),
    25: _neighbourhood(2, lambda dy, dx: True),  # 5x5
}
"""The offset sets of the original's ``num_connected`` settings, in its order (which fixes the conv channels)."""


def add_channel_residual(residual: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out`` plus ``residual`` on the channels they share: `residual` truncated to ``out``'s channels, or
    added to the first of them when it has fewer (the original's ``residual_auto``)."""
    shared = min(residual.shape[1], out.shape[1])
    if shared == out.shape[1]:
        return out + residual[:, :shared]
    return torch.cat([out[:, :shared] + residual, out[:, shared:]], dim=1)


class LocalAttender(nn.Module):
    """See the module docstring. ``guide_channels``: channels of the guide; ``neighbourhood``: 5, 9, 13, 17, 25.

    Example:
        >>> attender = LocalAttender(guide_channels=64)
        >>> attender(torch.randn(1, 64, 32, 32), torch.randn(1, 384, 16, 16)).shape
        torch.Size([1, 384, 32, 32])
    """

    def __init__(self, guide_channels: int, neighbourhood: int = 17):
        super().__init__()
        if neighbourhood not in NEIGHBOURHOODS:
            raise ValueError(
                f"LocalAttender neighbourhood {neighbourhood}: expected one of "
                f"{', '.join(map(str, NEIGHBOURHOODS))}"
            )
        if guide_channels < 1:
            raise ValueError(f"LocalAttender guide_channels must be >= 1, got {guide_channels}")
        self.guide_channels = int(guide_channels)
        self.offsets = NEIGHBOURHOODS[neighbourhood]
        self.radius = max(max(abs(dy), abs(dx)) for dy, dx in self.offsets)
        self.logits = nn.Conv2d(guide_channels, neighbourhood, kernel_size=1)

    def weights(self, guide: torch.Tensor) -> torch.Tensor:
        """The softmax weights ``[B, D, H, W]`` over the offsets, per guide pixel."""
        return F.softmax(add_channel_residual(guide, self.logits(guide)), dim=1)

    def forward(
        self,
        guide: torch.Tensor,
        values: torch.Tensor,
        guide_row0: int = 0,
        values_row0: int = 0,
        values_height: int | None = None,
    ) -> torch.Tensor:
        """Rows ``guide_row0 .. guide_row0 + R`` of the output, ``[B, C, R, I*w]``, in float32 or the values' dtype.

        `guide` ``[B, G, R, I*w]`` holds those rows of the guide; `values` ``[B, C, n, w]`` holds rows
        ``values_row0 .. values_row0 + n`` of a value map ``values_height`` rows high (default ``n``), and must
        include every row the output rows reach (their own row ``// I`` within the radius, clamped).
        """
        if guide.ndim != 4 or values.ndim != 4 or guide.shape[0] != values.shape[0]:
            raise InputSizeError(
                f"LocalAttender: expected guide [B, G, H, W] and values [B, C, h, w] with one batch size, got "
                f"{list(guide.shape)} and {list(values.shape)}"
            )
        if guide.shape[1] != self.guide_channels:
            raise InputSizeError(
                f"LocalAttender was built for {self.guide_channels} guide channels, got {guide.shape[1]}"
            )
        batch, channels, rows_given, width = values.shape
        height = rows_given if values_height is None else int(values_height)
        out_rows, out_width = guide.shape[-2:]
        factor = out_width // width
        if factor < 1 or factor * width != out_width or guide_row0 % factor or out_rows % factor:
            raise InputSizeError(
                f"LocalAttender: guide width {out_width} must be a whole multiple of the values' width {width}, "
                f"and its rows {guide_row0}..{guide_row0 + out_rows} whole blocks of that factor"
            )
        low0, low_rows = guide_row0 // factor, out_rows // factor
        first = max(0, low0 - self.radius)
        last = min(height, low0 + low_rows + self.radius)  # one past
        if first < values_row0 or last > values_row0 + rows_given or low0 + low_rows > height:
            raise InputSizeError(
                f"LocalAttender: output rows {guide_row0}..{guide_row0 + out_rows} need value rows "
                f"{first}..{last} of {height}, got rows {values_row0}..{values_row0 + rows_given}"
            )
        # the value rows and columns each output block reaches, the edges repeated beyond the map
        r = self.radius
        row_index = torch.arange(low0 - r, low0 + low_rows + r, device=values.device).clamp(0, height - 1)
        col_index = torch.arange(-r, width + r, device=values.device).clamp(0, width - 1)
        padded = values.index_select(2, row_index - values_row0).index_select(3, col_index)
        weights = self.weights(guide).reshape(batch, len(self.offsets), low_rows, factor, width, factor)
        dtype = torch.promote_types(values.dtype, torch.float32)
        out = torch.zeros(batch, channels, low_rows, factor, width, factor, dtype=dtype, device=values.device)
        for d, (dy, dx) in enumerate(self.offsets):
            shifted = padded[:, :, r + dy : r + dy + low_rows, r + dx : r + dx + width]
            out.addcmul_(shifted[:, :, :, None, :, None], weights[:, None, d])
        return out.reshape(batch, channels, out_rows, out_width)
