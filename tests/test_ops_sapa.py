"""featlift.ops.SAPA: the official SAPA-I/B/G similarity kernels, chunked, trainable, compilable, autocast."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from featlift.errors import InputSizeError
from featlift.meters import peak_memory_mib
from featlift.ops import SAPA


@torch.no_grad()
def naive_sapa(op: SAPA, features: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
    """SAPA by its definition: full-map GroupNorm and 1x1 convs, then loops over output pixels and taps; a tap
    outside the map has similarity 0 (it stays in the softmax) and value 0, as the official CUDA ops."""
    if op.norm:
        norm_guide = F.group_norm(
            guide, op.norm_guide.num_groups, op.norm_guide.weight, op.norm_guide.bias, op.norm_guide.eps
        )
        norm_features = F.group_norm(
            features, op.norm_features.num_groups, op.norm_features.weight, op.norm_features.bias
        )
    else:
        norm_guide, norm_features = guide, features
    if op.variant == "I":
        queries, keys = norm_guide, norm_features
    else:
        queries = F.conv2d(norm_guide, op.query.weight, op.query.bias)
        keys = F.conv2d(norm_features, op.key.weight, op.key.bias)
    if op.variant == "G":
        gate = torch.sigmoid(F.conv2d(norm_features, op.gate.weight, op.gate.bias))
        query_features = F.conv2d(features, op.query_features.weight, op.query_features.bias)
    s, k = op.scale_factor, op.up_kernel
    radius = k // 2
    batch, channels, height, width = features.shape
    out = torch.zeros(batch, channels, s * height, s * width, dtype=features.dtype)
    for b in range(batch):
        for y_out in range(s * height):
            for x_out in range(s * width):
                y, x = y_out // s, x_out // s
                query = queries[b, :, y_out, x_out]
                if op.variant == "G":
                    g = gate[b, 0, y, x]
                    query = g * query + (1 - g) * query_features[b, :, y, x]
                similarities, values = [], []
                for i in range(k):
                    for j in range(k):
                        yy, xx = y + i - radius, x + j - radius
                        inside = 0 <= yy < height and 0 <= xx < width
                        similarities.append(float(query @ keys[b, :, yy, xx]) if inside else 0.0)
                        values.append(
                            features[b, :, yy, xx] if inside else torch.zeros(channels, dtype=out.dtype)
                        )
                exps = [math.exp(v) for v in similarities]
                out[b, :, y_out, x_out] = sum(e / sum(exps) * v for e, v in zip(exps, values, strict=True))
    return out


def spread(op: SAPA, std: float = 0.5) -> SAPA:
    """Projections large enough that the kernels are far from uniform (the official std=0.02 init is not)."""
    for module in op.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                torch.nn.init.normal_(module.bias, std=std)
        elif isinstance(module, torch.nn.GroupNorm):
            torch.nn.init.normal_(module.weight, mean=1.0, std=std)
            torch.nn.init.normal_(module.bias, std=std)
    return op


def inputs(channels=4, guide_channels=4, scale=2, height=4, width=5, batch=1, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, channels, height, width, dtype=dtype, generator=generator)
    guide = torch.randn(
        batch, guide_channels, scale * height, scale * width, dtype=dtype, generator=generator
    )
    return features, guide


@pytest.mark.parametrize(
    ("variant", "scale", "norm", "up_kernel"),
    [("I", 2, True, 3), ("B", 2, True, 5), ("B", 3, False, 3), ("G", 2, True, 3), ("G", 3, True, 3)],
)
def test_sapa_equals_the_naive_definition(variant, scale, norm, up_kernel):
    torch.manual_seed(0)
    guide_channels = 4 if variant == "I" else 6
    op = SAPA(4, guide_channels, scale, up_kernel, embedding_dim=3, norm=norm, variant=variant, norm_groups=2)
    op = spread(op.double())
    features, guide = inputs(4, guide_channels, scale)
    expected = naive_sapa(op, features, guide)
    for chunk_rows in (1, 3, None):
        op.chunk_rows = chunk_rows
        torch.testing.assert_close(op(features, guide), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("variant", ["I", "B", "G"])
def test_chunked_equals_unchunked(variant):
    op = spread(SAPA(8, 8, embedding_dim=4, variant=variant, norm_groups=4))
    features, guide = inputs(8, 8, 2, 7, 6, batch=2, dtype=torch.float32)
    whole = op(features, guide)
    for chunk_rows in (1, 5, 14):
        op.chunk_rows = chunk_rows
        torch.testing.assert_close(op(features, guide), whole, atol=1e-5, rtol=1e-5)
    op.chunk_rows, op.max_memory_mib = None, 0.01
    torch.testing.assert_close(op(features, guide), whole, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["I", "G"])
def test_gradcheck_features_guide_and_parameters(variant):
    op = spread(
        SAPA(2, 2, up_kernel=3, embedding_dim=2, variant=variant, norm_groups=1, chunk_rows=2)
    ).double()
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
    e = 32
    norms = 2 * c + 2 * cg
    projection = c * e + e
    by_hand = {"I": norms, "B": norms + 2 * projection, "G": norms + 3 * projection + c + 1}
    assert by_hand == {"I": 1_024, "B": 17_472, "G": 25_953}
    for variant, count in by_hand.items():
        assert sum(p.numel() for p in SAPA(c, cg, variant=variant).parameters()) == count
    assert sum(p.numel() for p in SAPA(c, cg, norm=False, qkv_bias=False).parameters()) == 2 * c * e


def test_trains_inside_a_small_network():
    torch.manual_seed(3)
    encoder = torch.nn.Conv2d(3, 8, 3, padding=1)
    sapa = SAPA(8, 8, embedding_dim=4, variant="G", norm_groups=4, chunk_rows=5)
    images = torch.randn(2, 3, 12, 12)
    target = torch.randn(2, 8, 12, 12)
    optimizer = torch.optim.Adam([*encoder.parameters(), *sapa.parameters()], lr=1e-2)
    losses = []
    for _ in range(8):
        high = encoder(images)
        loss = F.mse_loss(sapa(F.avg_pool2d(high, 2), high), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sapa.query.weight.grad.abs().sum() > 0 and sapa.gate.weight.grad.abs().sum() > 0
    assert losses[-1] < losses[0]


def test_compiles_with_dynamo_fullgraph():
    op = spread(SAPA(4, 4, embedding_dim=4, variant="G", norm_groups=2, chunk_rows=3))
    features, guide = inputs(4, 4, 2, dtype=torch.float32)
    compiled = torch.compile(op, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(features, guide), op(features, guide))


def test_autocast_bfloat16_keeps_the_input_dtype_and_stays_close():
    op = spread(SAPA(16, 16, embedding_dim=8, norm_groups=4), std=0.1)
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
    op = spread(SAPA(8, 8, embedding_dim=4, variant="G", norm_groups=4))
    features, guide = inputs(8, 8, 2, 5, 6, batch=2, dtype=torch.float32)
    expected = op(features, guide)
    out = op(features.to(memory_format=torch.channels_last), guide.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_bad_input_errors():
    op = SAPA(8, 6, norm_groups=2)
    features, guide = inputs(8, 6, 2, 4, 4, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"SAPA needs a guide: the high-res encoder features \[B, 6, 8, 8\]"):
        op(features)
    with pytest.raises(InputSizeError, match=r"guide must be \[1, 6, 8, 8\].*got \[1, 6, 12, 12\]"):
        op(features, torch.randn(1, 6, 12, 12))
    with pytest.raises(InputSizeError, match=r"guide must be \[1, 6, 8, 8\].*got \[1, 5, 8, 8\]"):
        op(features, torch.randn(1, 5, 8, 8))
    with pytest.raises(InputSizeError, match=r"SAPA features must be \[B, 8, h, w\], got \[1, 6, 4, 4\]"):
        op(torch.randn(1, 6, 4, 4), guide)
    with pytest.raises(ValueError, match="norm_groups=32 must divide guide_channels=3"):
        SAPA(64, 3)
    with pytest.raises(ValueError, match="variant must be one of I, B, G, got 'X'"):
        SAPA(64, 64, variant="X")
    with pytest.raises(ValueError, match=r"guide_channels \(32\) must equal channels \(64\)"):
        SAPA(64, 32, variant="I")
    assert SAPA(64, 3, norm=False)(torch.randn(1, 64, 2, 2), torch.randn(1, 3, 4, 4)).shape == (1, 64, 4, 4)


def test_peak_memory_is_bounded_by_the_budget():
    """384 channels, 64x64 -> 128x128, a 64-channel guide: beyond the output, the inputs' storages and the
    low-res maps computed once (normalised features, keys), the working memory stays within 8 MiB."""
    op = SAPA(384, 64, variant="G", max_memory_mib=8)
    features, guide = inputs(384, 64, 2, 64, 64, dtype=torch.float32)
    mib = 4 / 2**20
    output = 384 * 128 * 128 * mib
    inputs_ = (features.numel() + guide.numel()) * mib
    low_res = (384 * 64 * 64 + 32 * 64 * 68 + 32 * 64 * 64 + 32 * 64 * 64 + 64 * 64) * mib
    guide_statistics = 2 * 32 * 4 / 2**20
    working = peak_memory_mib(lambda: op(features, guide)) - output - inputs_ - low_res - guide_statistics
    assert 0 < working <= 8, f"{working:.1f} MiB of working memory with an 8 MiB budget"
