"""Kernel reassembly: every output pixel a softmax-weighted sum over a ``k x k`` neighbourhood of low-res features.

The operation CARAFE introduced and SAPA and FADE reuse (mmcv's compiled ``carafe`` op). For features
``x [B, C, h, w]``, scale ``s``, kernel size ``k = 2r + 1`` and ``G`` kernel groups::

    out[b, c, Y, X] = sum_{i, j < k} kernels[b, g(c) * k² + i * k + j, Y, X] * x[b, c, Y // s + i - r, X // s + j - r]

with ``x`` zero outside the map and ``g(c) = c // (C / G)``. Output pixel ``(Y, X)`` sits in low-res pixel
``(Y // s, X // s)``; its kernel (one per output pixel, shared over the channels of a group) is centred there.

Pure PyTorch, without unfolding the neighbourhoods (``k² x C x H x W``: 25 times the output): the output is
computed a band of output rows at a time. For a band the low-res rows it reaches (with the ``r``-row halo) are
nearest-upsampled once, so tap ``(i, j)`` is the shifted view ``up[Y + i*s, X + j*s]`` of that copy, and the
taps are accumulated into the band with ``addcmul_``. The kernels come from a callable the operator gives,
``kernel_rows(start, stop) -> [B, G*k², stop - start, s*w]`` (already normalised), so an operator generates the
kernels of one band only. Working memory per band: the accumulator, the upsampled copy and the kernels.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from featlift.errors import InputSizeError
from featlift.upsamplers.chunking import DEFAULT_MAX_MEMORY_MIB, check_chunking, chunk_length, chunk_slices

KernelRows = Callable[[int, int], torch.Tensor]
"""``kernel_rows(start, stop)``: the normalised kernels ``[B, G*k², stop - start, s*w]`` of output rows
``start .. stop - 1``."""

FinishRows = Callable[[int, int, torch.Tensor], torch.Tensor]
"""``finish_rows(start, stop, band)``: an operator's last step on a reassembled band (FADE's gate)."""


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype kernels and sums are computed in: float32 for half-precision inputs, else the input's own."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def check_kernel_size(owner: str, kernel_size: int) -> int:
    """`kernel_size` as int; ValueError naming `owner` unless it is odd and >= 1."""
    if int(kernel_size) != kernel_size or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"{owner} up_kernel must be an odd integer >= 1, got {kernel_size}")
    return int(kernel_size)


def check_scale_factor(owner: str, scale_factor: int) -> int:
    """`scale_factor` as int; ValueError naming `owner` unless it is an integer >= 1."""
    if int(scale_factor) != scale_factor or scale_factor < 1:
        raise ValueError(f"{owner} scale_factor must be an integer >= 1, got {scale_factor}")
    return int(scale_factor)


def check_chunk_rows(owner: str, chunk_rows: int | None, max_memory_mib: float | None) -> None:
    """ValueError naming `owner` for ``chunk_rows < 1`` or a budget that is not a positive finite number."""
    if chunk_rows is not None and (int(chunk_rows) != chunk_rows or chunk_rows < 1):
        raise ValueError(
            f"{owner} chunk_rows must be an integer >= 1 (or None: from the budget), got {chunk_rows}"
        )
    check_chunking(owner, None, max_memory_mib)


def band_rows(
    height: int,
    bytes_per_row: float,
    halo_bytes: float,
    chunk_rows: int | None,
    max_memory_mib: float | None,
) -> int:
    """Output rows per band: `chunk_rows` when given, else as many as the budget holds after `halo_bytes`
    (the part of a band's working memory that does not grow with its rows)."""
    if chunk_rows is not None:
        return chunk_length(height, bytes_per_row, int(chunk_rows))
    budget_mib = DEFAULT_MAX_MEMORY_MIB if max_memory_mib is None else float(max_memory_mib)
    left_mib = max(budget_mib - halo_bytes / 2**20, 1e-6)
    return chunk_length(height, bytes_per_row, None, left_mib)


def reassembly_bytes_per_row(
    channels: int, width: int, scale_factor: int, kernel_size: int, groups: int, element_size: int
) -> tuple[float, float]:
    """``(bytes per output row, bytes per band independent of its rows)`` of `reassemble`'s own tensors: the
    float accumulator, the kernels, the band's low-res rows with their ``r``-pixel zero border and their nearest
    upsampling (``s`` copies of each low-res row, ``s * (w + 2r)`` wide); a band of ``n`` output rows reaches
    at most ``n / s + 2r + 1`` low-res rows."""
    radius = kernel_size // 2
    out_width = scale_factor * width
    up_width = scale_factor * (width + 2 * radius)
    low_row = channels * (width + 2 * radius) * element_size
    per_row = channels * out_width * element_size + groups * kernel_size**2 * out_width * element_size
    per_row += channels * up_width * element_size + low_row / scale_factor
    halo = (channels * up_width * element_size * scale_factor + low_row) * (2 * radius + 1)
    return float(per_row), float(halo)


def low_res_rows(start: int, stop: int, scale_factor: int, halo: int) -> tuple[int, int]:
    """The low-res rows ``first .. last`` (inclusive, may reach outside the map) output rows ``start .. stop-1``
    and a ``halo``-row neighbourhood around them use."""
    return start // scale_factor - halo, (stop - 1) // scale_factor + halo


def rows_with_zero_halo(tensor: torch.Tensor, first: int, last: int, columns: int = 0) -> torch.Tensor:
    """Rows ``first .. last`` (inclusive) of `tensor` ``[B, C, H, W]``, rows outside ``0 .. H-1`` as zeros, and
    `columns` zero columns added on each side (one copy at most; a view when nothing is added)."""
    height = tensor.shape[-2]
    inside = tensor[:, :, max(first, 0) : min(last, height - 1) + 1]
    above, below = max(0, -first), max(0, last - (height - 1))
    if above or below or columns:
        inside = F.pad(inside, (columns, columns, above, below))
    return inside


def upsample_nearest(tensor: torch.Tensor, scale: int) -> torch.Tensor:
    """`tensor` ``[B, C, H, W]`` nearest-upsampled by the integer `scale` in both dims, in one copy."""
    if scale == 1:
        return tensor
    batch, channels, height, width = tensor.shape
    spread = tensor[:, :, :, None, :, None].expand(batch, channels, height, scale, width, scale)
    return spread.reshape(batch, channels, height * scale, width * scale)


def nearest_rows(
    tensor: torch.Tensor, first: int, last: int, start: int, stop: int, scale: int
) -> torch.Tensor:
    """Output rows ``start .. stop-1`` of the nearest-``scale``x upsampling of `tensor`'s low-res rows
    ``first .. last`` (a band cut by `rows_with_zero_halo`), columns upsampled too."""
    up = upsample_nearest(tensor, scale)
    offset = start - first * scale
    return up[:, :, offset : offset + stop - start]


def reassemble(
    features: torch.Tensor,
    kernel_rows: KernelRows,
    scale_factor: int,
    kernel_size: int,
    groups: int = 1,
    chunk_rows: int | None = None,
    max_memory_mib: float | None = None,
    extra_bytes_per_row: float = 0.0,
    finish_rows: FinishRows | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``[B, C, s*h, s*w]``: the kernels of `kernel_rows` applied to the ``k x k`` neighbourhoods of `features`.

    The output is computed `chunk_rows` output rows at a time (None: as many as `max_memory_mib`, default 512,
    holds, counting `reassembly_bytes_per_row` and the operator's `extra_bytes_per_row` for its kernel
    generation) and written into one preallocated output of `out_dtype` (default: the features' dtype); sums
    are in float32 for half-precision features. `finish_rows` (optional) maps each reassembled band to the
    band written (FADE's gate).
    """
    batch, channels, height, width = features.shape
    if channels % groups:
        raise ValueError(f"kernel reassembly: {channels} channels do not split into {groups} kernel groups")
    radius = kernel_size // 2
    taps = kernel_size**2
    dtype = compute_dtype(features.dtype)
    out_height, out_width = scale_factor * height, scale_factor * width
    per_row, halo_bytes = reassembly_bytes_per_row(
        channels, width, scale_factor, kernel_size, groups, torch.finfo(dtype).bits // 8
    )
    rows = band_rows(out_height, per_row + extra_bytes_per_row, halo_bytes, chunk_rows, max_memory_mib)
    memory_format = (
        torch.channels_last
        if features.is_contiguous(memory_format=torch.channels_last) and not features.is_contiguous()
        else torch.contiguous_format
    )
    out = torch.empty(
        batch,
        channels,
        out_height,
        out_width,
        dtype=features.dtype if out_dtype is None else out_dtype,
        device=features.device,
    ).contiguous(memory_format=memory_format)
    per_group = channels // groups
    for band in chunk_slices(out_height, rows):
        start, stop = band.start, band.stop
        kernels = kernel_rows(start, stop).to(dtype)
        expected = (batch, groups * taps, stop - start, out_width)
        if tuple(kernels.shape) != expected:
            raise ValueError(
                f"kernel reassembly: kernels {list(kernels.shape)} for rows {start}..{stop - 1}, "
                f"expected {list(expected)}"
            )
        first, last = low_res_rows(start, stop, scale_factor, radius)
        up = upsample_nearest(rows_with_zero_halo(features, first, last, radius).to(dtype), scale_factor)
        offset = start - (first + radius) * scale_factor
        up = up.view(batch, groups, per_group, up.shape[-2], up.shape[-1])
        kernels = kernels.view(batch, groups, taps, stop - start, out_width)
        acc = torch.zeros(
            batch, groups, per_group, stop - start, out_width, dtype=dtype, device=features.device
        )
        for tap in range(taps):
            i, j = divmod(tap, kernel_size)
            row0 = offset + i * scale_factor
            col0 = j * scale_factor
            shifted = up[..., row0 : row0 + stop - start, col0 : col0 + out_width]
            acc.addcmul_(shifted, kernels[:, :, tap : tap + 1])
        result = acc.view(batch, channels, stop - start, out_width)
        if finish_rows is not None:
            result = finish_rows(start, stop, result)
        out[:, :, start:stop] = result
        del kernels, up, acc, result, shifted  # free this band before the next one is built
    return out


def check_operator_inputs(
    owner: str,
    features: torch.Tensor,
    guide: torch.Tensor | None,
    channels: int,
    guide_channels: int | None,
    scale_factor: int,
) -> None:
    """InputSizeError naming `owner` and the shapes when `features` is not ``[B, channels, h, w]`` or, for an
    operator with a guide (`guide_channels` set), `guide` is missing or not ``[B, guide_channels, s*h, s*w]``;
    ValueError when an operator without a guide is given one."""
    if not isinstance(features, torch.Tensor) or features.ndim != 4 or features.shape[1] != channels:
        shape = list(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise InputSizeError(f"{owner} features must be [B, {channels}, h, w], got {shape}")
    if not features.is_floating_point():
        raise InputSizeError(f"{owner} features must be a floating-point tensor, got {features.dtype}")
    batch, _, height, width = features.shape
    if guide_channels is None:
        if guide is not None:
            raise ValueError(
                f"{owner} takes no guide (its kernels come from the features alone), got a guide of shape "
                f"{list(guide.shape)}: call it as {owner}(features)"
            )
        return
    if guide is None:
        raise ValueError(
            f"{owner} needs a guide: the high-res encoder features [B, {guide_channels}, {scale_factor * height}, "
            f"{scale_factor * width}] for features {list(features.shape)}, got None"
        )
    expected = [batch, guide_channels, scale_factor * height, scale_factor * width]
    if not isinstance(guide, torch.Tensor) or list(guide.shape) != expected:
        shape = list(guide.shape) if isinstance(guide, torch.Tensor) else type(guide).__name__
        raise InputSizeError(
            f"{owner} guide must be {expected} (scale_factor={scale_factor} times the features "
            f"{list(features.shape)}, {guide_channels} channels), got {shape}"
        )
