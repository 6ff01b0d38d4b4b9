"""The DySample operator (featlift.ops.dysample) against a naive per-output-pixel reference, at its
initialisation against bilinear interpolation, chunked against unchunked, and under compile/autocast/channels-last."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from featlift.errors import InputSizeError
from featlift.meters import peak_memory_mib
from featlift.ops.dysample import DySample


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def randomised(op: DySample, std: float = 0.7) -> DySample:
    """Large random weights, so offsets reach several pixels and often leave the map (border handling)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in op.parameters():
            parameter.normal_(0.0, std)
    return op


def conv1x1(weight: torch.Tensor, bias: torch.Tensor, values: list[float]) -> list[float]:
    return [
        float(bias[k]) + sum(float(weight[k, c, 0, 0]) * values[c] for c in range(len(values)))
        for k in range(weight.shape[0])
    ]


def bilinear_border(plane: torch.Tensor, px: float, py: float) -> float:
    """The bilinear sample of ``plane`` [h, w] at pixel-centre coordinates (px, py), clamped to the edge pixels."""
    h, w = plane.shape
    px, py = min(max(px, 0.0), w - 1.0), min(max(py, 0.0), h - 1.0)
    x0, y0 = math.floor(px), math.floor(py)
    x1, y1 = min(x0 + 1, w - 1), min(y0 + 1, h - 1)
    fx, fy = px - x0, py - y0
    top = (1 - fx) * float(plane[y0, x0]) + fx * float(plane[y0, x1])
    bottom = (1 - fx) * float(plane[y1, x0]) + fx * float(plane[y1, x1])
    return (1 - fy) * top + fy * bottom


def naive_dysample(op: DySample, features: torch.Tensor) -> torch.Tensor:
    """DySample by hand: for every output pixel, its offset from the 1x1 conv(s), then its bilinear sample."""
    batch, channels, h, w = features.shape
    s, groups = op.scale_factor, op.groups
    per_group = channels // groups
    scope_factor = 0.5 if op.dyscope else 0.25
    out = torch.zeros(batch, channels, s * h, s * w, dtype=torch.float64)
    for n in range(batch):
        for out_y in range(s * h):
            for out_x in range(s * w):
                y, a, x, b = out_y // s, out_y % s, out_x // s, out_x % s
                pixel = [float(v) for v in features[n, :, y, x]]
                if op.style == "lp":
                    offset = conv1x1(op.offset.weight, op.offset.bias, pixel)
                    scope = conv1x1(op.scope.weight, op.scope.bias, pixel) if op.dyscope else None
                    index = [
                        d * groups * s * s + g * s * s + a * s + b for d in (0, 1) for g in range(groups)
                    ]
                else:  # the shuffled pixel's channels c' are the features' channels c' * s² + a * s + b
                    shuffled = pixel[a * s + b :: s * s]
                    offset = conv1x1(op.offset.weight, op.offset.bias, shuffled)
                    scope = conv1x1(op.scope.weight, op.scope.bias, shuffled) if op.dyscope else None
                    index = [d * groups + g for d in (0, 1) for g in range(groups)]
                for g in range(groups):
                    ix, iy = index[g], index[groups + g]
                    dx, dy = offset[ix] * scope_factor, offset[iy] * scope_factor
                    if scope is not None:
                        dx *= 1 / (1 + math.exp(-scope[ix]))
                        dy *= 1 / (1 + math.exp(-scope[iy]))
                    px = x + (2 * b + 1 - s) / (2 * s) + dx
                    py = y + (2 * a + 1 - s) / (2 * s) + dy
                    for c in range(g * per_group, (g + 1) * per_group):
                        out[n, c, out_y, out_x] = bilinear_border(features[n, c], px, py)
    return out


@pytest.mark.parametrize(
    "style, scale, dyscope, groups",
    [("lp", 2, False, 4), ("lp", 2, True, 2), ("pl", 2, False, 4), ("pl", 2, True, 2), ("lp", 3, True, 2)],
)
def test_equals_the_naive_per_pixel_reference(style, scale, dyscope, groups):
    channels = 8 if scale == 2 else 4
    op = randomised(DySample(channels, scale, style, groups, dyscope)).double()
    features = torch.randn(2, channels, 3, 4, dtype=torch.float64)
    with torch.no_grad():
        got = op(features)
        want = naive_dysample(op, features)
    assert got.shape == (2, channels, 3 * scale, 4 * scale)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


@pytest.mark.parametrize("style, dyscope", [("lp", False), ("pl", True)])
def test_gradcheck_of_features_and_weights(style, dyscope):
    op = randomised(DySample(4, 2, style, 2, dyscope), std=0.3).double()
    features = torch.randn(1, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    names = [name for name, _ in op.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in op.parameters())

    def run(x, *values):
        return torch.func.functional_call(op, dict(zip(names, values, strict=True)), (x,))

    assert torch.autograd.gradcheck(run, (features, *params), atol=1e-6)


def test_parameter_count_at_256_channels_follows_the_formula():
    def count(op: DySample) -> int:
        return sum(p.numel() for p in op.parameters())

    # lp: a 1x1 conv C -> 2 * groups * s² with bias; pl: C / s² -> 2 * groups; dyscope doubles it
    assert count(DySample(256)) == 256 * 2 * 4 * 4 + 2 * 4 * 4 == 8224
    assert count(DySample(256, dyscope=True)) == 2 * 8224
    assert count(DySample(256, style="pl")) == (256 // 4) * 2 * 4 + 2 * 4 == 520
    assert count(DySample(256, style="pl", dyscope=True)) == 1040
    assert count(DySample(256, scale_factor=4, groups=8)) == 256 * 2 * 8 * 16 + 2 * 8 * 16


@pytest.mark.parametrize(
    "style, scale, dyscope", [("lp", 2, False), ("pl", 2, True), ("lp", 3, True), ("pl", 4, False)]
)
def test_with_zero_offsets_it_is_bilinear_interpolation_without_corner_alignment(style, scale, dyscope):
    """Zero offsets sample every output pixel's centre: F.interpolate's bilinear with ``align_corners=False``,
    whose clamping of positions outside the outer pixel centres is grid_sample's ``padding_mode="border"``."""
    op = DySample(16, scale, style, 4, dyscope).double()
    torch.nn.init.zeros_(op.offset.weight)
    features = torch.randn(2, 16, 5, 7, dtype=torch.float64)
    want = F.interpolate(features, scale_factor=scale, mode="bilinear", align_corners=False)
    torch.testing.assert_close(op(features), want, atol=1e-12, rtol=0)


def test_at_the_papers_initialisation_it_is_close_to_bilinear():
    """Offset weights normal(std 0.001), zero bias and zero scope: offsets of ~1e-3 pixels, so the output is
    within ~1e-2 of bilinear for unit features (while a zero-weight DySample is exactly bilinear)."""
    torch.manual_seed(0)
    op = DySample(64, dyscope=True)
    assert op.offset.bias.abs().max() == 0 and op.scope.weight.abs().max() == 0
    assert 0.0008 < float(op.offset.weight.detach().std()) < 0.0012
    features = torch.randn(1, 64, 8, 8)
    with torch.no_grad():
        difference = op(features) - F.interpolate(
            features, scale_factor=2, mode="bilinear", align_corners=False
        )
    assert 0 < float(difference.abs().max()) < 0.05


@pytest.mark.parametrize("style, chunk_rows", [("lp", 1), ("lp", 3), ("pl", 2), ("pl", 5)])
def test_chunked_equals_unchunked(style, chunk_rows):
    whole = randomised(DySample(8, 2, style, 2, dyscope=True)).double()
    chunked = DySample(8, 2, style, 2, dyscope=True, chunk_rows=chunk_rows).double()
    chunked.load_state_dict(whole.state_dict())
    features = torch.randn(2, 8, 7, 5, dtype=torch.float64)
    assert chunked.rows_per_chunk(7, 5, 8) == max(1, chunk_rows // 2)
    torch.testing.assert_close(chunked(features), whole(features), atol=1e-12, rtol=0)
    budget = DySample(8, 2, style, 2, dyscope=True, max_memory_mib=0.001).double()
    budget.load_state_dict(whole.state_dict())
    assert budget.rows_per_chunk(7, 5, 8) < 7
    torch.testing.assert_close(budget(features), whole(features), atol=1e-12, rtol=0)


def test_the_memory_budget_bounds_the_working_memory_beyond_the_output():
    """Beyond the output (and the input, whose views the CPU tracker counts as new), a 0.5 MiB budget keeps
    the working memory near 0.5 MiB, where the unchunked op holds the whole map's grid and coordinates."""
    features = torch.randn(1, 64, 192, 192)
    output_mib, input_mib = 4 * features.numel() * 4 / 2**20, features.numel() * 4 / 2**20
    with torch.no_grad():
        whole = peak_memory_mib(lambda: DySample(64)(features)) - output_mib - input_mib
        bounded = peak_memory_mib(lambda: DySample(64, max_memory_mib=0.5)(features)) - output_mib - input_mib
    assert bounded < 0.5 + 0.25
    assert whole > 4 * bounded


def test_the_output_is_allocated_in_the_output_dtype():
    op = randomised(DySample(8, 2, "lp", 2, chunk_rows=2, output_dtype="bfloat16"), std=0.2)
    features = torch.randn(1, 8, 5, 4)
    got = op(features)
    assert got.dtype == torch.bfloat16
    op.output_dtype = None
    torch.testing.assert_close(got, op(features).to(torch.bfloat16))


def test_gradients_flow_through_chunks():
    op = randomised(DySample(8, 2, "lp", 2, chunk_rows=2), std=0.2)
    features = torch.randn(1, 8, 5, 4, requires_grad=True)
    op(features).square().sum().backward()
    assert features.grad.abs().sum() > 0 and op.offset.weight.grad.abs().sum() > 0


def test_channels_last_gives_the_same_output():
    op = randomised(DySample(16, dyscope=True), std=0.2)
    features = torch.randn(2, 16, 6, 5)
    torch.testing.assert_close(
        op(features.to(memory_format=torch.channels_last)), op(features), atol=1e-6, rtol=0
    )
    op_last = op.to(memory_format=torch.channels_last)
    torch.testing.assert_close(
        op_last(features.to(memory_format=torch.channels_last)), op(features), atol=1e-6, rtol=0
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_keeps_the_features_dtype_and_samples_positions_in_float32(dtype):
    op = randomised(DySample(16, style="pl", dyscope=True), std=0.2)
    features = torch.randn(1, 16, 8, 8)
    with torch.autocast("cpu", dtype=dtype):
        got = op(features)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, op(features), atol=0.05, rtol=0)
    half = op.to(dtype)(features.to(dtype))
    assert half.dtype == dtype
    torch.testing.assert_close(half.float(), got, atol=0.1, rtol=0)


def test_compiles_into_one_graph():
    """A smoke test of torch.compile (the aot_eager backend traces the whole forward without a C++ compiler)."""
    op = randomised(DySample(8, 2, "lp", 2, dyscope=True), std=0.2)
    features = torch.randn(1, 8, 4, 6)
    compiled = torch.compile(op, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(features), op(features), atol=1e-6, rtol=0)


def test_bad_input_is_refused_naming_the_value():
    op = DySample(8, groups=2)
    with pytest.raises(InputSizeError, match=r"expected \[B, 8, h, w\], got \[1, 6, 4, 4\]"):
        op(torch.randn(1, 6, 4, 4))
    with pytest.raises(InputSizeError, match=r"got \[8, 4, 4\]"):
        op(torch.randn(8, 4, 4))
    with pytest.raises(InputSizeError, match="floating-point.*torch.int64"):
        op(torch.ones(1, 8, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"takes no guide.*\[1, 8, 8, 8\]"):
        op(torch.randn(1, 8, 4, 4), torch.randn(1, 8, 8, 8))
    with pytest.raises(ValueError, match="output_dtype 'float8'"):
        DySample(8, output_dtype="float8")
    with pytest.raises(ValueError, match="style 'xy'"):
        DySample(8, style="xy")
    with pytest.raises(ValueError, match=r"channels \(6\) must be a positive multiple of groups \(4\)"):
        DySample(6)
    with pytest.raises(ValueError, match=r"channels \(8\) must be a multiple of scale_factor² \(9\)"):
        DySample(8, scale_factor=3, style="pl", groups=2)
    with pytest.raises(ValueError, match="scale_factor must be an integer >= 1, got 1.5"):
        DySample(8, scale_factor=1.5)
    with pytest.raises(ValueError, match="chunk_rows must be >= 1"):
        DySample(8, chunk_rows=0)
    with pytest.raises(ValueError, match="max_memory_mib must be > 0"):
        DySample(8, max_memory_mib=-1)
