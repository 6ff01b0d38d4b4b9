"""featlift.ops.FADE: semi-shift kernels from encoder and decoder, the decoder-dependent gate, FADE-Lite."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from featlift.errors import InputSizeError
from featlift.meters import peak_memory_mib
from featlift.ops import FADE


@torch.no_grad()
def naive_fade(op: FADE, features: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
    """FADE by its definition: full-map convs (the shared conv applied to the compressed encoder at high
    resolution and to the compressed decoder at low resolution), an explicit softmax, loops over output pixels
    and taps (zeros outside the map), the gate taken at the output pixel's low-res pixel."""
    halo = op.encoder_kernel // 2
    groups = op.kernel_encoder.groups
    compressed_guide = F.conv2d(guide, op.compress_guide.weight, op.compress_guide.bias)
    compressed_features = F.conv2d(features, op.compress_features.weight)
    weight, bias = op.kernel_encoder.weight, op.kernel_encoder.bias
    from_guide = F.conv2d(compressed_guide, weight, bias, padding=halo, groups=groups)
    from_features = F.conv2d(compressed_features, weight, bias, padding=halo, groups=groups)
    gate = torch.sigmoid(F.conv2d(features, op.gate.weight, op.gate.bias)) if op.gating else None
    s, k = op.scale_factor, op.up_kernel
    radius = k // 2
    batch, channels, height, width = features.shape
    out = torch.zeros(batch, channels, s * height, s * width, dtype=features.dtype)
    for b in range(batch):
        for y_out in range(s * height):
            for x_out in range(s * width):
                y, x = y_out // s, x_out // s
                logits = [
                    float(from_guide[b, t, y_out, x_out] + from_features[b, t, y, x]) for t in range(k * k)
                ]
                exps = [math.exp(v) for v in logits]
                total = torch.zeros(channels, dtype=features.dtype)
                for tap in range(k * k):
                    i, j = divmod(tap, k)
                    yy, xx = y + i - radius, x + j - radius
                    if 0 <= yy < height and 0 <= xx < width:
                        total += exps[tap] / sum(exps) * features[b, :, yy, xx]
                if gate is not None:
                    g = gate[b, 0, y, x]
                    total = g * guide[b, :, y_out, x_out] + (1 - g) * total
                out[b, :, y_out, x_out] = total
    return out


def spread(op: FADE, std: float = 0.5) -> FADE:
    """Weights and biases large enough that kernels and gate are far from uniform / one half."""
    for module in op.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                torch.nn.init.normal_(module.bias, std=std)
    return op


def inputs(channels=3, guide_channels=3, scale=2, height=4, width=5, batch=1, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, channels, height, width, dtype=dtype, generator=generator)
    guide = torch.randn(
        batch, guide_channels, scale * height, scale * width, dtype=dtype, generator=generator
    )
    return features, guide


@pytest.mark.parametrize(
    ("scale", "lite", "gating", "up_kernel", "encoder_kernel"),
    [
        (2, False, True, 3, 3),
        (2, True, True, 5, 3),
        (3, False, True, 3, 3),
        (3, True, False, 3, 1),
        (2, False, False, 3, 5),
    ],
)
def test_fade_equals_the_naive_definition(scale, lite, gating, up_kernel, encoder_kernel):
    torch.manual_seed(0)
    guide_channels = 3 if gating else 5
    op = FADE(3, guide_channels, scale, up_kernel, encoder_kernel, gating=gating, lite=lite, embedding_dim=4)
    op = spread(op.double())
    features, guide = inputs(3, guide_channels, scale)
    expected = naive_fade(op, features, guide)
    for chunk_rows in (1, 3, None):
        op.chunk_rows = chunk_rows
        torch.testing.assert_close(op(features, guide), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("lite", [False, True])
def test_semi_shift_equals_the_stride_two_formulation_of_the_original(lite):
    """FADE_H2L.py computes the encoder half at 2x as a stride-2 3x3 conv over four copies of the compressed
    encoder, each padded by one pixel on a different pair of sides (one per sub-pixel position), and the
    decoder half as a stride-1 conv broadcast over the four; that must equal this module's kernels."""
    torch.manual_seed(1)
    op = spread(FADE(3, 3, lite=lite, embedding_dim=4).double())
    features, guide = inputs(3, 3, 2, 4, 6)
    compressed_guide = F.conv2d(guide, op.compress_guide.weight, op.compress_guide.bias)
    compressed_features = F.conv2d(features, op.compress_features.weight)
    weight, bias, groups = op.kernel_encoder.weight, op.kernel_encoder.bias, op.kernel_encoder.groups
    from_features = F.conv2d(compressed_features, weight, bias, padding=1, groups=groups)
    expected = torch.zeros(1, op.up_kernel**2, 8, 12, dtype=torch.float64)
    for dy in (0, 1):
        for dx in (0, 1):
            shifted = F.pad(compressed_guide, (1 - dx, dx, 1 - dy, dy))
            from_guide = F.conv2d(shifted, weight, bias, stride=2, groups=groups)
            expected[:, :, dy::2, dx::2] = from_guide + from_features
    with torch.no_grad():
        logits = op.kernel_logits(guide, op.compress_features(features), 0, 8)
    torch.testing.assert_close(logits, expected, atol=1e-9, rtol=0)


@pytest.mark.parametrize("lite", [False, True])
def test_chunked_equals_unchunked(lite):
    op = spread(FADE(8, 8, lite=lite, embedding_dim=4))
    features, guide = inputs(8, 8, 2, 7, 6, batch=2, dtype=torch.float32)
    whole = op(features, guide)
    for chunk_rows in (1, 5, 14):
        op.chunk_rows = chunk_rows
        torch.testing.assert_close(op(features, guide), whole, atol=1e-5, rtol=1e-5)
    op.chunk_rows, op.max_memory_mib = None, 0.01
    torch.testing.assert_close(op(features, guide), whole, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lite", [False, True])
def test_gradcheck_features_guide_and_parameters(lite):
    op = spread(FADE(2, 2, up_kernel=3, lite=lite, embedding_dim=2, chunk_rows=2)).double()
    features, guide = inputs(2, 2, 2, 3, 3)
    features.requires_grad_(True)
    guide.requires_grad_(True)
    names = [name for name, _ in op.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in op.parameters()]

    def run(features, guide, *values):
        return torch.func.functional_call(op, dict(zip(names, values, strict=True)), (features, guide))

    assert torch.autograd.gradcheck(run, (features, guide, *params), fast_mode=True)


def test_parameter_counts():
    c = cg = 256
    k, e, dim = 5, 3, 64
    gate = c + 1
    fade = (cg * dim + dim) + c * dim + (dim * k * k * e * e + k * k) + gate
    lite = (cg * k * k + k * k) + c * k * k + (k * k * e * e + k * k) + gate
    assert (fade, lite) == (47_514, 13_332)
    assert sum(p.numel() for p in FADE(c, cg).parameters()) == fade
    assert sum(p.numel() for p in FADE(c, cg, lite=True).parameters()) == lite
    assert sum(p.numel() for p in FADE(c, 64, gating=False).parameters()) == fade - gate - (cg - 64) * dim


def test_trains_inside_a_small_network():
    torch.manual_seed(3)
    encoder = torch.nn.Conv2d(3, 8, 3, padding=1)
    fade = FADE(8, 8, embedding_dim=4, chunk_rows=5)
    images = torch.randn(2, 3, 12, 12)
    target = torch.randn(2, 8, 12, 12)
    optimizer = torch.optim.Adam([*encoder.parameters(), *fade.parameters()], lr=1e-2)
    losses = []
    for _ in range(8):
        high = encoder(images)
        loss = F.mse_loss(fade(F.avg_pool2d(high, 2), high), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert fade.kernel_encoder.weight.grad.abs().sum() > 0 and fade.gate.weight.grad.abs().sum() > 0
    assert losses[-1] < losses[0]


def test_compiles_with_dynamo_fullgraph():
    op = spread(FADE(4, 4, embedding_dim=4, chunk_rows=3))
    features, guide = inputs(4, 4, 2, dtype=torch.float32)
    compiled = torch.compile(op, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(features, guide), op(features, guide))


def test_autocast_bfloat16_keeps_the_input_dtype_and_stays_close():
    op = spread(FADE(16, 16, embedding_dim=8), std=0.1)
    features, guide = inputs(16, 16, 2, 6, 7, dtype=torch.float32)
    expected = op(features, guide)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = op(features, guide)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, atol=0.05, rtol=0.05)
    half = op.to(torch.bfloat16)(features.to(torch.bfloat16), guide.to(torch.bfloat16))
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), expected, atol=0.1, rtol=0.1)


def test_channels_last_input_gives_the_same_output():
    op = spread(FADE(8, 8, embedding_dim=4))
    features, guide = inputs(8, 8, 2, 5, 6, batch=2, dtype=torch.float32)
    expected = op(features, guide)
    out = op(features.to(memory_format=torch.channels_last), guide.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_bad_input_errors():
    op = FADE(8, 8)
    features, guide = inputs(8, 8, 2, 4, 4, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"FADE needs a guide: the high-res encoder features \[B, 8, 8, 8\]"):
        op(features)
    with pytest.raises(InputSizeError, match=r"FADE guide must be \[1, 8, 8, 8\].*got \[1, 8, 4, 4\]"):
        op(features, torch.randn(1, 8, 4, 4))
    with pytest.raises(InputSizeError, match=r"guide must be \[1, 8, 8, 8\].*got \[1, 6, 8, 8\]"):
        op(features, torch.randn(1, 6, 8, 8))
    with pytest.raises(
        InputSizeError, match=r"FADE-Lite features must be \[B, 8, h, w\], got \[1, 4, 4, 4\]"
    ):
        FADE(8, 8, lite=True)(torch.randn(1, 4, 4, 4), guide)
    with pytest.raises(
        ValueError, match=r"guide_channels \(6\) must equal channels \(8\), or set gating=False"
    ):
        FADE(8, 6)
    with pytest.raises(ValueError, match="encoder_kernel must be an odd integer >= 1, got 2"):
        FADE(8, 8, encoder_kernel=2)
    assert FADE(8, 6, gating=False)(features, torch.randn(1, 6, 8, 8)).shape == (1, 8, 8, 8)


def test_peak_memory_is_bounded_by_the_budget():
    """384 channels, 64x64 -> 128x128 with a 384-channel encoder guide: beyond the output, the inputs' storages
    and the low-res maps computed once (compressed decoder, gate), the working memory stays within 8 MiB."""
    op = FADE(384, 384, max_memory_mib=8)
    features, guide = inputs(384, 384, 2, 64, 64, dtype=torch.float32)
    mib = 4 / 2**20
    output = 384 * 128 * 128 * mib
    inputs_ = (features.numel() + guide.numel()) * mib
    low_res = (64 * 64 * 64 + 64 * 64) * mib
    working = peak_memory_mib(lambda: op(features, guide)) - output - inputs_ - low_res
    assert 0 < working <= 8, f"{working:.1f} MiB of working memory with an 8 MiB budget"
