"""Per-pixel kernels shared over channels, applied in pure PyTorch without unfolding the neighbourhoods.

``out[b, c, y, x] = sum_{i, j} kernels[b, i * d + j, y, x] * padded[b, c, y + i, x + j]`` for a ``d x d``
kernel (``d = 2r + 1``) per output pixel, with ``padded`` the features already padded by ``r`` on every side.
This is what FeatUp's compiled ``AdaptiveConv`` op computes (its kernels laid out ``[B, H, W, d, d]``; here
``[B, d*d, H, W]``, tap ``i * d + j`` = row offset ``i``, column offset ``j``, the order of ``nn.Unfold``).

The sum is accumulated tap by tap into one output tensor (``addcmul_`` with a shifted view of ``padded``), so the
working memory is the output alone, not the ``d*d x C x H x W`` of an unfold (4.9 GB at 256² x 384 channels);
its backward (`PixelKernels`) accumulates tap by tap too, into one gradient per input.
`unfold_pixel_kernels` is the plain unfold version, kept as the reference the tests compare against.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def tap_offsets(radius: int) -> Iterator[tuple[int, int]]:
    """The ``(row, column)`` offsets ``0 .. 2r`` of a ``(2r+1)²`` kernel's taps, in tap order (row-major)."""
    diameter = 2 * radius + 1
    for i in range(diameter):
        for j in range(diameter):
            yield i, j


def check_kernel_shapes(padded: torch.Tensor, kernels: torch.Tensor) -> int:
    """The kernel radius; ValueError when `padded` ``[B, C, H+2r, W+2r]`` and `kernels` ``[B, (2r+1)², H, W]`` disagree."""
    if padded.ndim != 4 or kernels.ndim != 4:
        raise ValueError(
            f"expected padded [B, C, H+2r, W+2r] and kernels [B, taps, H, W], got "
            f"{list(padded.shape)} and {list(kernels.shape)}"
        )
    taps = kernels.shape[1]
    diameter = int(round(taps**0.5))
    radius = (diameter - 1) // 2
    fits = (
        diameter**2 == taps
        and diameter % 2 == 1
        and padded.shape[0] == kernels.shape[0]
        and padded.shape[2] == kernels.shape[2] + 2 * radius
        and padded.shape[3] == kernels.shape[3] + 2 * radius
    )
    if not fits:
        raise ValueError(
            f"per-pixel kernels {list(kernels.shape)} do not fit padded features {list(padded.shape)}: expected "
            "kernels [B, d*d, H, W] (d odd) and features [B, C, H + d - 1, W + d - 1]"
        )
    return radius


def apply_pixel_kernels(padded: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]``: each output pixel's kernel applied to its neighbourhood of `padded`, tap by tap."""
    return PixelKernels.apply(padded, kernels)


def accumulate_taps(padded: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    radius = check_kernel_shapes(padded, kernels)
    batch, channels = padded.shape[:2]
    height, width = kernels.shape[-2:]
    dtype = torch.promote_types(padded.dtype, kernels.dtype)
    out = torch.zeros(batch, channels, height, width, dtype=dtype, device=padded.device)
    for tap, (i, j) in enumerate(tap_offsets(radius)):
        out.addcmul_(padded[:, :, i : i + height, j : j + width], kernels[:, tap : tap + 1])
    return out


class PixelKernels(torch.autograd.Function):
    """`accumulate_taps` with a backward that also works tap by tap, into one gradient buffer per input.

    Left to autograd, each of the ``d*d`` shifted views would get its own zero-filled gradient of the whole padded
    map (``SliceBackward``), summed afterwards: for FeatUp's 49 taps that was most of a training step's time. Here
    ``grad_padded[shifted view] += grad_out * kernel_tap`` and ``grad_kernels[tap] = sum_c grad_out * shifted view``.
    """

    @staticmethod
    def forward(ctx, padded: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(padded, kernels)
        return accumulate_taps(padded, kernels)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        padded, kernels = ctx.saved_tensors
        radius = check_kernel_shapes(padded, kernels)
        height, width = kernels.shape[-2:]
        wants_padded, wants_kernels = ctx.needs_input_grad[:2]
        grad_padded = torch.zeros_like(padded) if wants_padded else None
        grad_kernels = torch.empty_like(kernels) if wants_kernels else None
        for tap, (i, j) in enumerate(tap_offsets(radius)):
            if grad_padded is not None:
                grad_padded[:, :, i : i + height, j : j + width].addcmul_(
                    grad_out, kernels[:, tap : tap + 1].to(grad_out.dtype)
                )
            if grad_kernels is not None:
                shifted = padded[:, :, i : i + height, j : j + width]
                grad_kernels[:, tap] = (grad_out * shifted).sum(1)
        return grad_padded, grad_kernels


def unfold_pixel_kernels(padded: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """The same by unfolding every neighbourhood at once (``d*d`` times the memory): the tests' reference."""
    radius = check_kernel_shapes(padded, kernels)
    batch, channels = padded.shape[:2]
    height, width = kernels.shape[-2:]
    diameter = 2 * radius + 1
    patches = F.unfold(padded, diameter).reshape(batch, channels, diameter * diameter, height, width)
    return torch.einsum("bcphw,bphw->bchw", patches, kernels)
