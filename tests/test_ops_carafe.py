"""featlift.ops.CARAFE: what mmcv's CARAFEPack computes, chunked, trainable, compilable, under autocast."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from featlift.errors import InputSizeError
from featlift.meters import peak_memory_mib
from featlift.ops import CARAFE


@torch.no_grad()
def naive_carafe(op: CARAFE, features: torch.Tensor) -> torch.Tensor:
    """CARAFEPack by its definition: full-map convs, mmcv's pixel-shuffle channel layout written out as an
    index, an explicit softmax, and loops over output pixels and taps (zeros outside the map)."""
    compressed = F.conv2d(features, op.channel_compressor.weight, op.channel_compressor.bias)
    padding = (op.encoder_kernel - 1) * op.encoder_dilation // 2
    encoded = F.conv2d(
        compressed,
        op.content_encoder.weight,
        op.content_encoder.bias,
        padding=padding,
        dilation=op.encoder_dilation,
    )
    s, k, groups = op.scale_factor, op.up_kernel, op.groups
    radius = k // 2
    batch, channels, height, width = features.shape
    out = torch.zeros(batch, channels, s * height, s * width, dtype=features.dtype)
    for b in range(batch):
        for y_out in range(s * height):
            for x_out in range(s * width):
                y, x, dy, dx = y_out // s, x_out // s, y_out % s, x_out % s
                for g in range(groups):
                    logits = [
                        encoded[b, (g * k * k + tap) * s * s + dy * s + dx, y, x] for tap in range(k * k)
                    ]
                    exps = [math.exp(float(v)) for v in logits]
                    weights = [e / sum(exps) for e in exps]
                    for c in range(g * channels // groups, (g + 1) * channels // groups):
                        total = 0.0
                        for tap in range(k * k):
                            i, j = divmod(tap, k)
                            yy, xx = y + i - radius, x + j - radius
                            if 0 <= yy < height and 0 <= xx < width:
                                total += weights[tap] * float(features[b, c, yy, xx])
                        out[b, c, y_out, x_out] = total
    return out


def spread_kernels(op: CARAFE, std: float = 0.5) -> CARAFE:
    """Kernels far from uniform (the paper's std=0.001 init gives nearly uniform ones), so layout errors show."""
    torch.nn.init.normal_(op.content_encoder.weight, std=std)
    torch.nn.init.normal_(op.content_encoder.bias, std=std)
    torch.nn.init.normal_(op.channel_compressor.bias, std=std)
    return op


@pytest.mark.parametrize(
    ("scale", "up_kernel", "groups", "dilation"), [(2, 3, 1, 1), (3, 3, 1, 1), (2, 5, 3, 1), (2, 3, 1, 2)]
)
def test_carafe_equals_the_naive_definition(scale, up_kernel, groups, dilation):
    torch.manual_seed(0)
    op = CARAFE(3, scale, up_kernel, encoder_dilation=dilation, compressed_channels=4, groups=groups)
    op = spread_kernels(op.double())
    features = torch.randn(1, 3, 4, 5, dtype=torch.float64)
    expected = naive_carafe(op, features)
    for chunk_rows in (1, 3, None):
        op.chunk_rows = chunk_rows
        torch.testing.assert_close(op(features), expected, atol=1e-6, rtol=0)


def test_chunked_equals_unchunked():
    torch.manual_seed(1)
    op = spread_kernels(CARAFE(8, compressed_channels=6))
    features = torch.randn(2, 8, 7, 6)
    op.chunk_rows = None
    whole = op(features)
    for chunk_rows in (1, 5, 14):
        op.chunk_rows = chunk_rows
        torch.testing.assert_close(op(features), whole, atol=1e-6, rtol=0)
    op.chunk_rows, op.max_memory_mib = None, 0.01
    torch.testing.assert_close(op(features), whole, atol=1e-6, rtol=0)


def test_gradcheck_features_and_parameters():
    torch.manual_seed(2)
    op = spread_kernels(CARAFE(2, up_kernel=3, compressed_channels=2, chunk_rows=2)).double()
    features = torch.randn(1, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    names = [name for name, _ in op.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in op.parameters()]

    def run(features, *values):
        return torch.func.functional_call(op, dict(zip(names, values, strict=True)), (features,))

    assert torch.autograd.gradcheck(run, (features, *params), fast_mode=True)


def test_parameter_count_at_the_papers_configuration():
    op = CARAFE(256)
    channels, compressed, k, e, s = 256, 64, 5, 3, 2
    by_hand = channels * compressed + compressed + compressed * k * k * s * s * e * e + k * k * s * s
    assert by_hand == 74_148  # the paper's operator table: 74K parameters
    assert sum(p.numel() for p in op.parameters()) == by_hand


def test_trains_inside_a_small_network():
    torch.manual_seed(3)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), CARAFE(8, compressed_channels=4, chunk_rows=3)
    )
    images = torch.randn(2, 3, 6, 6)
    target = torch.randn(2, 8, 12, 12)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = F.mse_loss(net(images), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert net[1].content_encoder.weight.grad.abs().sum() > 0
    assert losses[-1] < losses[0]


def test_compiles_with_dynamo_fullgraph():
    torch.manual_seed(4)
    op = spread_kernels(CARAFE(4, compressed_channels=4, chunk_rows=3))
    features = torch.randn(1, 4, 4, 5)
    compiled = torch.compile(op, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(features), op(features))


def test_autocast_bfloat16_keeps_the_input_dtype_and_stays_close():
    torch.manual_seed(5)
    op = spread_kernels(CARAFE(16, compressed_channels=8), std=0.1)
    features = torch.randn(1, 16, 6, 7)
    expected = op(features)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = op(features)
        compressed = op.channel_compressor(features)
        kernels = op.kernels(compressed, 0, 12)
    assert compressed.dtype == torch.bfloat16 and kernels.dtype == torch.float32  # softmax in float32
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, atol=0.05, rtol=0.05)
    half = op.to(torch.bfloat16)(features.to(torch.bfloat16))
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), expected, atol=0.1, rtol=0.1)


def test_channels_last_input_gives_the_same_output():
    torch.manual_seed(6)
    op = spread_kernels(CARAFE(8, compressed_channels=4))
    features = torch.randn(2, 8, 5, 6)
    expected = op(features)
    out = op(features.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_bad_input_errors():
    op = CARAFE(8)
    with pytest.raises(InputSizeError, match=r"CARAFE features must be \[B, 8, h, w\], got \[1, 6, 4, 4\]"):
        op(torch.randn(1, 6, 4, 4))
    with pytest.raises(InputSizeError, match=r"got \[8, 4, 4\]"):
        op(torch.randn(8, 4, 4))
    with pytest.raises(ValueError, match="CARAFE takes no guide"):
        op(torch.randn(1, 8, 4, 4), torch.randn(1, 8, 8, 8))
    with pytest.raises(ValueError, match="up_kernel must be an odd integer >= 1, got 4"):
        CARAFE(8, up_kernel=4)
    with pytest.raises(ValueError, match="groups must be an integer >= 1 dividing channels=8, got 3"):
        CARAFE(8, groups=3)
    with pytest.raises(ValueError, match="chunk_rows must be an integer >= 1"):
        CARAFE(8, chunk_rows=0)
    with pytest.raises(ValueError, match="scale_factor must be an integer >= 1, got 1.5"):
        CARAFE(8, scale_factor=1.5)


def test_peak_memory_is_bounded_by_the_budget():
    """384 channels, 64x64 -> 128x128: beyond the output (24 MiB) and the input features' storage (the bands
    slice it), the working memory stays within an 8 MiB budget; unfolding would take 25 x 24 MiB."""
    torch.manual_seed(7)
    op = CARAFE(384, max_memory_mib=8)
    features = torch.randn(1, 384, 64, 64)
    output_mib = 384 * 128 * 128 * 4 / 2**20
    inputs_mib = features.numel() * 4 / 2**20
    compressed_mib = 64 * 64 * 64 * 4 / 2**20  # the 1x1 compressor's output, computed once for the map
    working = peak_memory_mib(lambda: op(features)) - output_mib - inputs_mib - compressed_mib
    assert 0 < working <= 8, f"{working:.1f} MiB of working memory with an 8 MiB budget"
