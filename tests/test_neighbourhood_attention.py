"""`featlift.upsamplers.neighbourhood_attention` against a dense reference written here: the keys and values
resized to the output size (nearest-exact, as NAF does), full attention over every resized position with a
mask that keeps only NATTEN's dilated neighbourhood, computed from NATTEN's own window-start rule."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from train_helpers import one_thread

from featlift.upsamplers.neighbourhood_attention import (
    axis_windows,
    natten_window_positions,
    neighbourhood_attention,
    row_chunks,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """Small tensors run far faster on one thread on a busy machine."""
    with one_thread():
        yield


def natten_window_start(index: int, length: int, kernel: int, dilation: int) -> int:
    """NATTEN's ``get_window_start`` (neighbourhood size ``kernel // 2``), transcribed rule by rule."""
    half = kernel // 2
    if dilation <= 1:
        return max(index - half, 0) + (index + half >= length) * (length - index - half - 1)
    if index - half * dilation < 0:
        return index % dilation
    if index + half * dilation >= length:
        remainder_group = index % dilation
        whole = (length // dilation) * dilation
        extra = length - whole
        if remainder_group < extra:
            return length - extra + remainder_group - 2 * half * dilation
        return whole + remainder_group - kernel * dilation
    return index - half * dilation


def reference_axis_neighbours(length: int, tokens: int, kernel: int) -> list[list[int]]:
    """Per position of an axis of `length` (the resized map), its neighbour positions on that axis."""
    dilation = max(1, length // tokens)
    kernel = min(kernel, length // dilation)  # featlift's extension when NATTEN would refuse
    neighbours = []
    for index in range(length):
        start = natten_window_start(index, length, kernel, dilation)
        neighbours.append([start + dilation * t for t in range(kernel)])
    return neighbours


def dense_neighbourhood_attention(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, kernel: int
) -> torch.Tensor:
    """`queries` ``[B, heads, H, W, dk]``, `keys` / `values` ``[B, heads, h, w, d]`` -> ``[B, heads * dv, H, W]``."""
    batch, heads, height, width, key_dim = queries.shape
    grid = keys.shape[2:4]

    def resized(x: torch.Tensor) -> torch.Tensor:  # [B, heads, H * W, d]
        maps = x.permute(0, 1, 4, 2, 3).flatten(1, 2)
        maps = F.interpolate(maps, size=(height, width), mode="nearest-exact")
        return maps.view(batch, heads, -1, height * width).transpose(-1, -2)

    rows = reference_axis_neighbours(height, grid[0], kernel)
    columns = reference_axis_neighbours(width, grid[1], kernel)
    allowed = torch.zeros(height * width, height * width, dtype=torch.bool)
    for i in range(height):
        for j in range(width):
            for r in rows[i]:
                for c in columns[j]:
                    allowed[i * width + j, r * width + c] = True
    scores = queries.flatten(2, 3) @ resized(keys).transpose(-1, -2) * key_dim**-0.5
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    out = weights @ resized(values)  # [B, heads, H * W, dv]
    return out.permute(0, 1, 3, 2).reshape(batch, -1, height, width)


def chunked(queries, keys, values, kernel, rows_per_chunk):
    batch, heads, height, width, _ = queries.shape
    out = queries.new_empty(batch, heads * values.shape[-1], height, width)
    return neighbourhood_attention(lambda a, b: queries[:, :, a:b], keys, values, out, kernel, rows_per_chunk)


def random_inputs(grid, size, heads=2, key_dim=4, value_dim=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    queries = torch.randn(2, heads, *size, key_dim, generator=g)
    keys = torch.randn(2, heads, *grid, key_dim, generator=g)
    values = torch.randn(2, heads, *grid, value_dim, generator=g)
    return queries, keys, values


@pytest.mark.parametrize(
    ("grid", "size", "kernel"),
    [
        ((6, 6), (6, 6), 3),  # ratio 1, borders shift the window inward
        ((5, 7), (10, 14), 3),  # ratio 2, non-square
        ((4, 5), (12, 15), 3),  # ratio 3
        ((3, 4), (12, 16), 3),  # ratio 4
        ((10, 11), (20, 22), 9),  # NAF's kernel at ratio 2, every border case
        ((9, 9), (27, 18), 9),  # different ratios per axis, the kernel as large as the grid
        ((5, 4), (13, 11), 3),  # ratios 2.6 and 2.75: NATTEN's uneven groups, repeated tokens
        ((7, 6), (16, 9), 5),  # ratio 2.29 and 1.5
        ((3, 3), (9, 9), 9),  # a grid smaller than the kernel: the kernel shrinks
        ((8, 8), (5, 6), 3),  # an output smaller than the grid
    ],
)
def test_neighbourhood_attention_equals_the_masked_dense_reference(grid, size, kernel):
    queries, keys, values = random_inputs(grid, size)
    expected = dense_neighbourhood_attention(queries, keys, values, kernel)
    for rows_per_chunk in (1, 3, size[0]):
        out = chunked(queries, keys, values, kernel, rows_per_chunk)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_windows_follow_natten_rule_and_shift_inward_at_borders():
    for length in range(1, 40):
        for kernel in (1, 3, 5, 9):
            for dilation in range(1, 6):
                if kernel * dilation > length:
                    continue
                ours = natten_window_positions(length, kernel, dilation)
                for index in range(length):
                    start = natten_window_start(index, length, kernel, dilation)
                    assert ours[index].tolist() == [start + dilation * t for t in range(kernel)]
    # a whole ratio: the 9 tokens centred on the pixel's token, clamped inside the 16-token grid
    windows = axis_windows(32, 16, 9)
    assert windows[0].tolist() == list(range(9)) and windows[9].tolist() == list(range(9))
    assert windows[10].tolist() == list(range(1, 10)) and windows[31].tolist() == list(range(7, 16))


def test_row_chunks_keep_runs_whole_and_split_long_ones_evenly():
    assert row_chunks([2, 2, 2], 4) == [(0, 4), (4, 6)]
    assert row_chunks([5, 2], 2) == [(0, 1), (1, 3), (3, 5), (5, 7)]
    assert row_chunks([3, 3], 100) == [(0, 6)]
    assert row_chunks([1, 1, 1], 1) == [(0, 1), (1, 2), (2, 3)]


def test_mismatched_shapes_are_refused():
    queries, keys, values = random_inputs((4, 4), (8, 8))
    out = queries.new_empty(2, 5, 8, 8)  # 2 heads x 3 value channels is 6
    with pytest.raises(ValueError, match="do not match"):
        neighbourhood_attention(lambda a, b: queries[:, :, a:b], keys, values, out, 3, 8)
