"""FeatUp's learned attention downsampler and its uncertainty head: the trainable parts of the `featup` objective.

`AttentionDownsampler` maps upsampled features ``[B, C, H, W]`` back to the token grid ``[B, C, h, w]``: the map
is blurred (5x5 Gaussian, sigma 1, reflect border: kornia's ``gaussian_blur2d`` as FeatUp calls it), cut into
``k x k`` patches (``k = H // h``, stride ``(H - k) // (h - 1)``: FeatUp's), and each patch is averaged with a
softmax attention over its ``k²`` pixels whose logits are ``w * Linear(C -> 1)(feature) + b`` (``w``, ``b``
learned ``k x k`` maps initialised at 1 and 0 plus 0.01 noise). In training, FeatUp's two dropouts apply: 0.2 on
the features entering the linear layer, and a logit mask that keeps each patch's logits with probability 0.8
(FeatUp applies that mask in evaluation too; here it is off outside training, so validation is deterministic).

`UncertaintyScale` is FeatUp's ``ScaleNet`` (its ``outlier_detection: True``): a per-token scale
``exp(conv1x1(C -> 1)(f) + 0.1)`` clamped at 1e-4 (weights initialised at 0.1x PyTorch's default) that weighs
the reconstruction error as ``err / (2 s²) + log s``.

Parameters at C=384 and k=16: downsampler 385 + 2 x 256 = 897; uncertainty 385.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BLUR_SIZE = 5
BLUR_SIGMA = 1.0
FEATURE_DROPOUT = 0.2
LOGIT_KEEP = 0.8


def gaussian_blur(features: torch.Tensor, size: int = BLUR_SIZE, sigma: float = BLUR_SIGMA) -> torch.Tensor:
    """Separable normalised Gaussian blur of every channel, reflect-padded (kornia's ``gaussian_blur2d``)."""
    offsets = torch.arange(size, dtype=features.dtype, device=features.device) - (size - 1) / 2
    weights = torch.exp(-offsets.square() / (2 * sigma**2))
    weights = weights / weights.sum()
    channels = features.shape[1]
    padded = F.pad(features, [size // 2] * 4, mode="reflect")
    rows = F.conv2d(padded, weights.view(1, 1, size, 1).expand(channels, 1, size, 1), groups=channels)
    return F.conv2d(rows, weights.view(1, 1, 1, size).expand(channels, 1, 1, size), groups=channels)


class AttentionDownsampler(nn.Module):
    """FeatUp's attention downsampler for `channels` features and ``kernel x kernel`` patches; see the module doc."""

    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.channels = int(channels)
        self.kernel = int(kernel)
        self.logits = nn.Linear(channels, 1)
        self.logit_weight = nn.Parameter(torch.ones(kernel, kernel) + 0.01 * torch.randn(kernel, kernel))
        self.logit_bias = nn.Parameter(torch.zeros(kernel, kernel) + 0.01 * torch.randn(kernel, kernel))

    def forward(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        batch, channels, height, width = features.shape
        k = self.kernel
        strides = [
            (size - k) // (cells - 1) if cells > 1 else k
            for size, cells in zip((height, width), grid, strict=True)
        ]
        if min(strides) < 1 or any(
            (cells - 1) * s + k > size for size, cells, s in zip((height, width), grid, strides, strict=True)
        ):
            raise ValueError(
                f"attention downsampler: a {height}x{width} map does not cover a {grid[0]}x{grid[1]} grid of "
                f"{k}x{k} patches"
            )
        blurred = gaussian_blur(features)
        if strides == [k, k] and (height, width) == (grid[0] * k, grid[1] * k):
            return self.tiled(blurred, grid)
        return self.unfolded(blurred, grid, (strides[0], strides[1]))

    def unfolded(
        self, blurred: torch.Tensor, grid: tuple[int, int], strides: tuple[int, int]
    ) -> torch.Tensor:
        """FeatUp's computation on the unfolded patches ``[B, h, w, k², C]`` (any stride, overlapping or not)."""
        batch, channels = blurred.shape[:2]
        k = self.kernel
        patches = F.unfold(blurred, k, stride=strides)  # [B, C * k², h * w]
        patches = patches.reshape(batch, channels, k * k, grid[0], grid[1]).permute(0, 3, 4, 2, 1)
        inputs = F.dropout(patches, FEATURE_DROPOUT, self.training)
        logits = self.logits(inputs).squeeze(-1)  # [B, h, w, k²]
        attention = self.attention(logits, batch, grid)
        return torch.einsum("bhwpc,bhwp->bchw", patches, attention)

    def attention(self, logits: torch.Tensor, batch: int, grid: tuple[int, int]) -> torch.Tensor:
        """Softmax attention ``[B, h, w, k²]`` over each patch from its logits (with FeatUp's logit mask in training)."""
        if self.training:
            logits = logits * (torch.rand(batch, grid[0], grid[1], 1, device=logits.device) < LOGIT_KEEP)
        return torch.softmax(logits * self.logit_weight.flatten() + self.logit_bias.flatten(), dim=-1)

    def tiled(self, blurred: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """The same when the patches tile the map exactly (stride = k, ``H = h k``), without unfolding it.

        Every pixel is then in exactly one patch, so the linear layer is a 1x1 convolution of the whole map, the
        feature dropout can be drawn per pixel (the same distribution as per patch element), and the weighted
        sum is a sum over each ``k x k`` block of the map times its attention laid out as the map. No
        ``[B, h, w, k², C]`` copy is made; this is what every FeatUp jitter of a JBU's 16x map takes.
        """
        batch, channels, height, width = blurred.shape
        k, (rows, cols) = self.kernel, grid
        inputs = F.dropout(blurred, FEATURE_DROPOUT, self.training)
        logit_map = F.conv2d(inputs, self.logits.weight.view(1, channels, 1, 1), self.logits.bias)
        logits = (
            logit_map.view(batch, rows, k, cols, k).permute(0, 1, 3, 2, 4).reshape(batch, rows, cols, k * k)
        )
        attention = self.attention(logits, batch, grid)
        weights = (
            attention.view(batch, rows, cols, k, k).permute(0, 1, 3, 2, 4).reshape(batch, 1, height, width)
        )
        return (blurred * weights).view(batch, channels, rows, k, cols, k).sum(dim=(3, 5))


class UncertaintyScale(nn.Module):
    """FeatUp's ``ScaleNet``: a positive scale per token of the target features; see the module docstring."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, 1, 1)
        with torch.no_grad():
            self.conv.weight.mul_(0.1)
            self.conv.bias.mul_(0.1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.conv(features) + 0.1).clamp_min(1e-4)


def weighted_error(error: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """FeatUp's uncertainty-weighted reconstruction loss ``mean(err / (2 s²) + log s)``."""
    return (error / (2 * scales.square()) + scales.log()).mean()


def random_projection(batch: int, channels: int, dims: int, like: torch.Tensor) -> torch.Tensor:
    """``[B, C, dims]`` Gaussian directions, each of unit norm over the channels (FeatUp's random projection)."""
    projection = torch.randn(batch, channels, dims, device=like.device, dtype=like.dtype)
    return projection / projection.square().sum(1, keepdim=True).sqrt()


def project(features: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    return torch.einsum("bchw,bcd->bdhw", features, projection)
