"""2-D rotary position embedding of an image's feature map, as JAFAR and AnyUp apply it to their image encoding.

Each pixel ``(row, column)`` of an ``H x W`` map gets the coordinates ``(row / (H - 1), column / (W - 1))``
(``linspace(0, 1)`` along each axis, so both ends of the map are 0 and 1 whatever its size). A learned
``freqs`` matrix ``[2, D]`` turns them into one angle per channel, ``angle = coords @ freqs``, and the
channels are rotated in pairs ``(x_i, x_{i + D/2})`` by that angle:
``x * cos(angle) + rotate_half(x) * sin(angle)`` with ``rotate_half([a, b]) = [-b, a]``.

The initial frequencies (both methods' checkpoints store the trained ``freqs``, so this only matters for
a fresh module): ``theta ** linspace(0, -1, D / 4)``, repeated twice, times ``2 pi``; the rows' first
``D / 2`` channels rotate with the row coordinate, the last ``D / 2`` with the column coordinate.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def grid_coordinates(
    height: int, width: int, *, device: torch.device | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``[height * width, 2]`` (row, column) coordinates, each ``linspace(0, 1)``, in row-major pixel order."""
    rows = torch.linspace(0, 1, height, device=device, dtype=dtype)
    columns = torch.linspace(0, 1, width, device=device, dtype=dtype)
    return torch.stack(torch.meshgrid(rows, columns, indexing="ij"), dim=-1).reshape(height * width, 2)


def swap_halves_negated(x: torch.Tensor) -> torch.Tensor:
    """``[a, b] -> [-b, a]`` over the last dimension (the partner of each channel in its rotation pair)."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class RotaryEmbedding2d(nn.Module):
    """Rotates ``D`` channels by angles learned from the 2-D pixel coordinates (see the module doc)."""

    def __init__(self, dim: int, theta: float = 100.0):
        super().__init__()
        if dim < 4 or dim % 4:
            raise ValueError(f"rotary embedding dim must be a positive multiple of 4, got {dim}")
        self.dim = int(dim)
        self.theta = float(theta)
        self.freqs = nn.Parameter(torch.empty(2, self.dim))
        self.reset_frequencies()

    @torch.no_grad()
    def reset_frequencies(self) -> None:
        quarter = self.theta ** torch.linspace(0, -1, self.dim // 4)
        half = torch.cat([quarter, quarter])
        freqs = torch.zeros(2, self.dim)
        freqs[0, : self.dim // 2] = half
        freqs[1, -self.dim // 2 :] = half
        self.freqs.copy_(freqs * 2 * math.pi)

    def forward(self, x: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """`x` ``[..., N, D]`` rotated at the ``[N, 2]`` coordinates `coords`."""
        angle = coords @ self.freqs
        return x * angle.cos() + swap_halves_negated(x) * angle.sin()

    def rotate_map(self, image: torch.Tensor) -> torch.Tensor:
        """A ``[B, D, H, W]`` feature map with every pixel rotated at its grid coordinates."""
        batch, dim, height, width = image.shape
        coords = grid_coordinates(height, width, device=image.device, dtype=image.dtype)
        pixels = image.permute(0, 2, 3, 1).reshape(batch, height * width, dim)
        return self(pixels, coords).reshape(batch, height, width, dim).permute(0, 3, 1, 2)
