"""Per-channel mean and standard deviation of features seen batch by batch, for the probes' standardisation."""

from __future__ import annotations

import torch


class ChannelMoments:
    """Running sums of ``[B, C, H, W]`` batches in float64, so that features streamed batch by batch give the
    statistics one pass over all of them would, and no float64 copy of a whole feature set is ever made."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.squares: torch.Tensor | None = None
        self.count = 0

    def add(self, features: torch.Tensor) -> None:
        values = features.detach().to("cpu", torch.float64)
        total, squares = values.sum((0, 2, 3)), values.square().sum((0, 2, 3))
        self.total = total if self.total is None else self.total + total
        self.squares = squares if self.squares is None else self.squares + squares
        self.count += values.numel() // values.shape[1]

    def mean_std(self, min_std: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and unbiased standard deviation per channel, ``[1, C, 1, 1]`` float32, the std at least
        `min_std` (a constant channel is left as is rather than divided by zero)."""
        if self.total is None:
            raise ValueError("ChannelMoments.mean_std: no features were added")
        mean = self.total / self.count
        variance = (self.squares - self.count * mean.square()) / max(self.count - 1, 1)
        std = variance.clamp_min(0).sqrt().clamp_min(min_std)
        return mean.float()[None, :, None, None], std.float()[None, :, None, None]
