"""featlift.ops.reassembly: per-output-pixel k x k kernels over the low-res neighbourhood, chunked over rows."""

from __future__ import annotations

import pytest
import torch

from featlift.meters import peak_memory_mib
from featlift.ops.reassembly import (
    band_rows,
    check_operator_inputs,
    nearest_rows,
    reassemble,
    rows_with_zero_halo,
)


def naive_reassembly(features, kernels, scale, kernel_size, groups=1):
    """Explicit loops over output pixels and taps, the definition of mmcv's carafe op (zeros outside)."""
    batch, channels, height, width = features.shape
    radius = kernel_size // 2
    out = torch.zeros(batch, channels, scale * height, scale * width, dtype=features.dtype)
    per_group = channels // groups
    for b in range(batch):
        for y_out in range(scale * height):
            for x_out in range(scale * width):
                for c in range(channels):
                    g = c // per_group
                    total = 0.0
                    for i in range(kernel_size):
                        for j in range(kernel_size):
                            y, x = y_out // scale + i - radius, x_out // scale + j - radius
                            if 0 <= y < height and 0 <= x < width:
                                tap = g * kernel_size**2 + i * kernel_size + j
                                total = total + kernels[b, tap, y_out, x_out] * features[b, c, y, x]
                    out[b, c, y_out, x_out] = total
    return out


def slicer(kernels):
    return lambda start, stop: kernels[:, :, start:stop]


@pytest.mark.parametrize(
    ("scale", "kernel_size", "groups", "channels"), [(2, 3, 1, 3), (3, 3, 1, 3), (2, 5, 2, 4), (1, 3, 1, 2)]
)
def test_reassembly_equals_the_naive_loops(scale, kernel_size, groups, channels):
    torch.manual_seed(0)
    features = torch.randn(1, channels, 4, 5, dtype=torch.float64)
    kernels = torch.randn(1, groups * kernel_size**2, 4 * scale, 5 * scale, dtype=torch.float64)
    expected = naive_reassembly(features, kernels, scale, kernel_size, groups)
    for chunk_rows in (1, 3, None):
        out = reassemble(features, slicer(kernels), scale, kernel_size, groups, chunk_rows=chunk_rows)
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_chunked_equals_unchunked_and_the_budget_picks_bands():
    torch.manual_seed(1)
    features = torch.randn(2, 6, 7, 5)
    kernels = torch.randn(2, 25, 14, 10).softmax(1)
    whole = reassemble(features, slicer(kernels), 2, 5, chunk_rows=14)
    seen = []

    def recording(start, stop):
        seen.append((start, stop))
        return kernels[:, :, start:stop]

    for chunk_rows in (1, 4, 14, 100):
        seen.clear()
        torch.testing.assert_close(reassemble(features, recording, 2, 5, chunk_rows=chunk_rows), whole)
        assert seen[0][0] == 0 and seen[-1][1] == 14
        assert all(stop - start <= chunk_rows for start, stop in seen)
    seen.clear()
    torch.testing.assert_close(reassemble(features, recording, 2, 5, max_memory_mib=0.01), whole)
    assert len(seen) > 1


def test_gradcheck_features_and_kernels():
    torch.manual_seed(2)
    features = torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    kernels = torch.randn(1, 9, 6, 8, dtype=torch.float64, requires_grad=True)

    def run(features, kernels):
        return reassemble(features, slicer(kernels), 2, 3, chunk_rows=4)

    assert torch.autograd.gradcheck(run, (features, kernels))


def test_band_helpers():
    tensor = torch.arange(4.0).view(1, 1, 4, 1)
    band = rows_with_zero_halo(tensor, -2, 1)
    assert band.flatten().tolist() == [0, 0, 0, 1]
    assert rows_with_zero_halo(tensor, 2, 5).flatten().tolist() == [2, 3, 0, 0]
    up = nearest_rows(tensor[:, :, 1:3], 1, 2, 3, 6, 2)
    assert up[0, 0, :, 0].tolist() == [1, 2, 2]
    assert band_rows(100, 1000.0, 0.0, 7, None) == 7
    assert band_rows(100, 2**20, 0.0, None, 10.0) == 10
    assert band_rows(100, 2**20, 4 * 2**20, None, 10.0) == 6


def test_channels_last_input_gives_the_same_output():
    torch.manual_seed(3)
    features = torch.randn(2, 8, 5, 6)
    kernels = torch.randn(2, 9, 10, 12)
    expected = reassemble(features, slicer(kernels), 2, 3)
    out = reassemble(features.to(memory_format=torch.channels_last), slicer(kernels), 2, 3, chunk_rows=3)
    torch.testing.assert_close(out, expected)


def test_working_memory_is_bounded_by_the_budget():
    """The CPU tracker counts the output, the inputs' storages (a band's slice of them is a view) and every
    tensor the bands create; what is left beyond output and inputs must stay within the budget."""
    features = torch.randn(1, 384, 64, 64)
    kernels = torch.randn(1, 25, 128, 128).softmax(1)
    output_mib = 384 * 128 * 128 * 4 / 2**20
    inputs_mib = (features.numel() + kernels.numel()) * 4 / 2**20
    for budget in (4, 16):
        peak = peak_memory_mib(lambda b=budget: reassemble(features, slicer(kernels), 2, 5, max_memory_mib=b))
        working = peak - output_mib - inputs_mib
        assert 0 < working <= budget, f"{working:.1f} MiB of working memory with a {budget} MiB budget"
    unfold_mib = 25 * output_mib
    assert working < unfold_mib / 30


def test_operator_input_errors_name_the_shapes():
    features = torch.randn(1, 4, 3, 5)
    with pytest.raises(ValueError, match=r"features must be \[B, 6, h, w\], got \[1, 4, 3, 5\]"):
        check_operator_inputs("OP", features, None, 6, None, 2)
    with pytest.raises(ValueError, match="OP takes no guide"):
        check_operator_inputs("OP", features, torch.randn(1, 4, 6, 10), 4, None, 2)
    with pytest.raises(ValueError, match="OP needs a guide"):
        check_operator_inputs("OP", features, None, 4, 3, 2)
    with pytest.raises(ValueError, match=r"guide must be \[1, 3, 6, 10\].*got \[1, 3, 6, 9\]"):
        check_operator_inputs("OP", features, torch.randn(1, 3, 6, 9), 4, 3, 2)
