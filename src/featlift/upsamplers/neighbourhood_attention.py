"""Cross-scale neighbourhood attention: every output pixel attends to a ``k x k`` window of the token grid,
as NAF computes it with NATTEN, in pure PyTorch and in chunks of output rows.

**What is computed** (NAF's ``CrossAttention``): the keys and values ``[h x w]`` are resized to the output
size ``H x W`` with ``F.interpolate(mode="nearest-exact")``, and NATTEN's 2-D neighbourhood attention runs on
that map with kernel ``k`` and dilation ``d = H // h`` (rows; ``W // w`` for columns). NATTEN's dilated
neighbourhood of position ``i`` along an axis of length ``L``: the positions are split into ``d`` interleaved
groups (``i % d``); in its group (length ``L_g = ceil((L - i % d) / d)``), ``i`` has index ``i // d`` and its
window is the ``k`` consecutive group indices starting at ``clamp(i // d - k // 2, 0, L_g - k)``: centred, and
shifted inward at the borders (never zero-padded), so every pixel sees exactly ``k x k`` keys. The window's
positions map back to tokens through the nearest-exact resize; when ``H`` is a multiple of ``h`` this is the
``k`` consecutive tokens centred on the token under the pixel, clamped inside the grid.

`axis_windows` gives, per output row (or column), its ``k`` token indices (duplicates kept, as the resized
map repeats tokens), so the 2-D neighbourhood of pixel ``(i, j)`` is ``rows[i] x columns[j]`` and attention
never materialises the resized keys and values.

**How**: output rows with the same row window form a run (``d`` rows for a whole ratio), and so do columns;
each (row run, column run) block of pixels shares its ``k*k`` keys and values, gathered once per block, and
one batched matmul per chunk computes the scores ``q.k / sqrt(d_head)``, the softmax over the ``k*k`` keys and
the weighted values. A run is padded (with repeats of its last pixel, dropped afterwards) to the longest run.

**Beyond NATTEN**: NATTEN refuses ``k * d > L``; here the kernel shrinks to the shortest group,
``min(k, L // d)`` along that axis (the whole token axis for a grid smaller than the kernel). The output
being smaller than the grid (``d = 0`` in NAF's code, which NATTEN refuses) uses ``d = 1``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F


def effective_kernel(output: int, tokens: int, kernel: int) -> tuple[int, int]:
    """(dilation, kernel) along one axis: ``d = max(1, output // tokens)`` and ``min(kernel, output // d)``."""
    if output < 1 or tokens < 1 or kernel < 1:
        raise ValueError(
            f"axis sizes and kernel must be >= 1, got output {output}, tokens {tokens}, kernel {kernel}"
        )
    dilation = max(1, output // tokens)
    return dilation, min(kernel, output // dilation)


def nearest_exact_sources(output: int, tokens: int) -> torch.Tensor:
    """``[output]`` long: the token each output position copies in ``F.interpolate(size=output,
    mode="nearest-exact")`` (taken from torch's own resize of ``arange(tokens)``, so it is that resize exactly)."""
    ramp = torch.arange(tokens, dtype=torch.float64).view(1, 1, tokens, 1)
    resized = F.interpolate(ramp, size=(output, 1), mode="nearest-exact")
    return resized.view(output).round().long()


def natten_window_positions(length: int, kernel: int, dilation: int) -> torch.Tensor:
    """``[length, kernel]``: NATTEN's dilated neighbourhood of every position of an axis of `length`
    (positions on that axis; see the module doc). Needs ``kernel * dilation <= length``."""
    if kernel * dilation > length:
        raise ValueError(f"kernel {kernel} x dilation {dilation} exceeds the axis length {length}")
    position = torch.arange(length)
    group, index = position % dilation, position // dilation
    group_length = (length - group + dilation - 1) // dilation
    start = torch.minimum((index - kernel // 2).clamp(min=0), group_length - kernel)
    return group[:, None] + dilation * (start[:, None] + torch.arange(kernel))


def axis_windows(output: int, tokens: int, kernel: int) -> torch.Tensor:
    """``[output, k]`` long: the tokens of every output position's neighbourhood along one axis (CPU)."""
    dilation, kernel = effective_kernel(output, tokens, kernel)
    return nearest_exact_sources(output, tokens)[natten_window_positions(output, kernel, dilation)]


def common_run_length(windows: torch.Tensor) -> int:
    """The most frequent length of the runs of equal consecutive windows (``d`` for a whole ratio ``d``; the
    runs at the borders, where the clamped windows repeat, are longer)."""
    _, counts = torch.unique_consecutive(windows, dim=0, return_counts=True)
    values, frequency = torch.unique(counts, return_counts=True)
    return int(values[frequency.argmax()])


class AxisRuns:
    """Consecutive output positions along one axis whose windows are equal, in runs of at most `longest`
    positions (longer runs of one window are cut into pieces of `longest` and a remainder).

    ``windows`` ``[runs, k]``: each run's token window; ``padded`` ``[runs, longest]``: each run's positions
    (from the first of `windows`), padded with its last one; ``placement`` ``[positions]``: where each position
    lies in the flattened ``padded`` (``run * longest + slot``); ``full``: no run is padded.
    """

    def __init__(self, windows: torch.Tensor, longest: int):
        distinct, counts = torch.unique_consecutive(windows, dim=0, return_counts=True)
        pieces = [min(longest, c - p) for c in counts.tolist() for p in range(0, c, longest)]
        owner = [run for run, c in enumerate(counts.tolist()) for _ in range(0, c, longest)]
        counts = torch.tensor(pieces)
        starts = torch.cumsum(counts, 0) - counts
        self.longest = int(counts.max())
        self.windows = distinct[torch.tensor(owner)]
        self.padded = starts[:, None] + torch.minimum(torch.arange(self.longest), counts[:, None] - 1)
        run_of = torch.repeat_interleave(torch.arange(len(counts)), counts)
        self.placement = run_of * self.longest + (torch.arange(len(windows)) - starts[run_of])
        self.counts = counts
        self.full = bool((counts == self.longest).all())  # no padding: `padded` and `placement` are aranges

    def to(self, device: torch.device) -> AxisRuns:
        for name in ("windows", "padded", "placement"):
            setattr(self, name, getattr(self, name).to(device))
        return self


def row_chunks(run_lengths: list[int], rows_per_chunk: int) -> list[tuple[int, int]]:
    """Consecutive ``(start, stop)`` output-row ranges of at most `rows_per_chunk` rows (at least one) that
    never split a run of equal windows unless the run alone is longer (then it is split evenly)."""
    rows_per_chunk = max(1, int(rows_per_chunk))
    chunks: list[tuple[int, int]] = []
    start = stop = 0
    for length in run_lengths:
        if length > rows_per_chunk:
            if stop > start:
                chunks.append((start, stop))
            pieces = math.ceil(length / rows_per_chunk)
            bounds = [stop + (length * p) // pieces for p in range(pieces + 1)]
            chunks.extend(zip(bounds[:-1], bounds[1:], strict=True))
            start = stop = stop + length
        elif stop + length - start > rows_per_chunk:
            chunks.append((start, stop))
            start, stop = stop, stop + length
        else:
            stop += length
    if stop > start:
        chunks.append((start, stop))
    return chunks


def bytes_per_pixel(heads: int, key_dim: int, value_dim: int, keys: int, element_size: int) -> int:
    """Working bytes one output pixel needs in `neighbourhood_attention`'s chunk, from the tensors it creates:
    its padded query (``heads x key_dim``), the scores and their softmax (``2 x heads x keys``), the weighted
    values, their reordering and the selection of real pixels (``3 x heads x value_dim``)."""
    return element_size * heads * (key_dim + 2 * keys + 3 * value_dim)


def window_bytes(heads: int, key_dim: int, value_dim: int, keys: int, columns: int, element_size: int) -> int:
    """Bytes of one row run's gathered key and value windows (with their reordered copies) over `columns`
    column runs."""
    return 2 * element_size * heads * columns * keys * (key_dim + value_dim)


def chunk_rows(width: int, per_pixel: int, per_run: int, rows_per_run: int, budget_bytes: float) -> int:
    """Output rows per chunk that fit `budget_bytes`: ``r`` rows cost ``r x width x per_pixel`` plus the
    windows of the ``r / rows_per_run + 1`` row runs they touch (`per_run` bytes each, `window_bytes`)."""
    row_cost = width * per_pixel + per_run / max(1, rows_per_run)
    return max(1, int((budget_bytes - per_run) // max(1.0, row_cost)))


def window_blocks(per_column: torch.Tensor, row_windows: torch.Tensor) -> torch.Tensor:
    """The ``kr x kc`` windows of every (row run, column run) block, ``[B, heads, Rr, Rc, kr * kc, d]``, from
    the column-gathered keys or values ``[B, heads, h, Rc, kc, d]`` and the row runs' windows ``[Rr, kr]``."""
    gathered = per_column[:, :, row_windows]  # [B, heads, Rr, kr, Rc, kc, d]
    return gathered.permute(0, 1, 2, 4, 3, 5, 6).flatten(4, 5)


def neighbourhood_attention(
    queries: Callable[[int, int], torch.Tensor],
    keys: torch.Tensor,
    values: torch.Tensor,
    out: torch.Tensor,
    kernel: int,
    rows_per_chunk: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Fill `out` ``[B, heads * dv, H, W]`` with the cross-scale neighbourhood attention of the output pixels
    over the token grid (see the module doc), `rows_per_chunk` output rows at a time (whole runs of equal
    windows when they fit).

    ``queries(start, stop)``: the queries of output rows ``start:stop``, ``[B, heads, stop - start, W, dk]``;
    `keys` ``[B, heads, h, w, dk]``, `values` ``[B, heads, h, w, dv]``; channel ``head * dv + c`` of `out` is
    channel ``c`` of the head's values. `scale`: the score factor, ``dk ** -0.5`` by default.
    """
    batch, heads, grid_h, grid_w, key_dim = keys.shape
    value_dim = values.shape[-1]
    height, width = out.shape[-2:]
    if values.shape[:4] != keys.shape[:4] or out.shape[:2] != (batch, heads * value_dim):
        raise ValueError(
            f"keys {list(keys.shape)}, values {list(values.shape)} and output {list(out.shape)} do not match: "
            "expected [B, heads, h, w, dk], [B, heads, h, w, dv] and [B, heads * dv, H, W]"
        )
    scale = key_dim**-0.5 if scale is None else float(scale)
    device = keys.device
    row_windows, column_windows = axis_windows(height, grid_h, kernel), axis_windows(width, grid_w, kernel)
    row_run = common_run_length(row_windows)
    columns = AxisRuns(column_windows, common_run_length(column_windows)).to(device)
    column_runs, column_slots = columns.windows.shape[0], columns.longest
    # the column part of every window, gathered once: [B, heads, h, column runs, kc, d]
    key_columns = keys[:, :, :, columns.windows]
    value_columns = values[:, :, :, columns.windows]
    run_lengths = AxisRuns(row_windows, row_run).counts.tolist()
    for start, stop in row_chunks(run_lengths, rows_per_chunk):
        rows = AxisRuns(row_windows[start:stop], row_run).to(device)
        row_runs, row_slots = rows.windows.shape[0], rows.longest
        block = row_slots * column_slots
        query = queries(start, stop)  # [B, heads, n, W, dk]
        if rows.full and columns.full:  # whole runs: the blocks are a view
            query = query.reshape(batch, heads, row_runs, row_slots, column_runs, column_slots, key_dim)
        else:
            query = query[:, :, rows.padded][:, :, :, :, columns.padded]  # [B, heads, Rr, Lr, Rc, Lc, dk]
        query = query.permute(0, 1, 2, 4, 3, 5, 6).reshape(
            batch, heads, row_runs, column_runs, block, key_dim
        )
        key_windows = window_blocks(key_columns, rows.windows)
        scores = query @ key_windows.transpose(-1, -2)
        del query, key_windows
        weights = scores.mul_(scale).softmax(dim=-1)
        del scores
        mixed = weights @ window_blocks(value_columns, rows.windows)  # [B, heads, Rr, Rc, Lr * Lc, dv]
        del weights
        mixed = mixed.view(batch, heads, row_runs, column_runs, row_slots, column_slots, value_dim)
        mixed = mixed.permute(0, 1, 6, 2, 4, 3, 5)  # [B, heads, dv, Rr, Lr, Rc, Lc]
        if rows.full and columns.full:  # written straight into the output's rows, one copy
            out[:, :, start:stop].view(mixed.shape).copy_(mixed)
            continue
        mixed = mixed.reshape(batch, heads * value_dim, row_runs * row_slots, column_runs * column_slots)
        out[:, :, start:stop] = mixed.index_select(2, rows.placement).index_select(3, columns.placement)
    return out
