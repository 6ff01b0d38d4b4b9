"""NAF (`featlift.upsamplers.naf`): the official computation written out densely here (the encoder from the
module's weights, NAF's pooling, DINOv3's RoPE, the nearest-exact keys and values and the masked neighbourhood
attention of `test_neighbourhood_attention`), shapes, chunking, dtype, memory, gradients, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_neighbourhood_attention import dense_neighbourhood_attention
from train_helpers import one_thread

from featlift.errors import InputSizeError
from featlift.meters import peak_memory_mib
from featlift.upsamplers.naf import NAF, pooled_rows
from featlift.upsamplers.registry import get_upsampler_class


@pytest.fixture(autouse=True)
def _one_thread():
    """Small tensors run far faster on one thread on a busy machine."""
    with one_thread():
        yield


SMALL = {"dim": 32, "attention_heads": 4, "rope_heads": 2}


def reference_branch(branch: torch.nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """Conv, then blocks GN-SiLU-conv-GN-SiLU-conv without residual, reflect padding, from `branch`'s weights."""

    def conv(layer, x):
        pad = layer.kernel_size[0] // 2
        return F.conv2d(F.pad(x, (pad,) * 4, mode="reflect") if pad else x, layer.weight, layer.bias)

    x = conv(branch[0], x)
    for block in list(branch)[1:]:
        x = conv(block.conv1, F.silu(F.group_norm(x, 8, block.norm1.weight, block.norm1.bias)))
        x = conv(block.conv2, F.silu(F.group_norm(x, 8, block.norm2.weight, block.norm2.bias)))
    return x


def reference_rope(x: torch.Tensor, heads: int, base: float = 100.0, scale: float = 1.0) -> torch.Tensor:
    """DINOv3's RoPE as NAF's ``src/layers/rope.py`` computes it (separate coordinate normalisation)."""
    batch, dim, height, width = x.shape
    head_dim = dim // heads
    periods = base ** (2 * torch.arange(head_dim // 4) / (head_dim // 2))
    rows = torch.arange(0.5, height) / height
    columns = torch.arange(0.5, width) / width
    coords = torch.stack(torch.meshgrid(rows, columns, indexing="ij"), dim=-1).flatten(0, 1)
    coords = (2.0 * coords - 1.0) * scale
    angles = (2 * math.pi * coords[:, :, None] / periods[None, None, :]).flatten(1, 2).tile(2)  # [HW, d]
    tokens = x.view(batch, heads, head_dim, height * width).transpose(-1, -2)  # [B, n, HW, d]
    first, second = tokens.chunk(2, dim=-1)
    rotated = tokens * angles.cos() + torch.cat([-second, first], dim=-1) * angles.sin()
    return rotated.transpose(-1, -2).reshape(batch, dim, height, width)


def reference_naf(module: NAF, features, guide, size, rope_scale: float = 1.0) -> torch.Tensor:
    height, width = guide.shape[-2:]
    if height > 4 * size[0] or width > 4 * size[1]:
        target = (min(height, 4 * size[0], 4 * size[1]), min(width, 4 * size[1], 4 * size[0]))
        guide = F.interpolate(guide, size=target, mode="bilinear", align_corners=False)
    encoded = torch.cat(
        [reference_branch(module.pixel_branch, guide), reference_branch(module.context_branch, guide)], dim=1
    )
    queries = reference_rope(
        F.adaptive_avg_pool2d(encoded, size), module.rotary.heads, module.rotary.base, rope_scale
    )
    keys = F.adaptive_avg_pool2d(queries, features.shape[-2:])
    heads = module.attention_heads

    def split(x):  # [B, (n d), h, w] -> [B, n, h, w, d]
        return x.view(x.shape[0], heads, -1, *x.shape[-2:]).permute(0, 1, 3, 4, 2)

    return dense_neighbourhood_attention(split(queries), split(keys), split(features), module.kernel_size)


def randomized(module: NAF, seed: int = 0) -> NAF:
    """`module` with random (not default) GroupNorm affines too, in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=g) * 0.3)
    return module.eval()


def inputs(channels=8, grid=(5, 6), guide=(40, 48), batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, *grid, generator=g), torch.randn(batch, 3, *guide, generator=g)


def test_parameter_count_is_the_published_one():
    naf = NAF()
    assert sum(p.numel() for p in naf.parameters()) == 662_528
    assert naf.config()["kernel_size"] == 9 and naf.rotary.head_dim == 64
    assert "rotary.periods" not in naf.state_dict()  # a fixed buffer, rebuilt from the config


@pytest.mark.parametrize(
    ("grid", "guide", "size"),
    [
        ((5, 6), (40, 48), (10, 12)),  # 2x
        ((5, 6), (40, 48), (15, 18)),  # 3x
        ((4, 5), (20, 20), (11, 13)),  # non-integer ratios
        ((6, 6), (120, 96), (12, 12)),  # a guide larger than 4x the output: resized first
        ((6, 6), (24, 24), (4, 5)),  # smaller than the grid
    ],
)
def test_naf_equals_the_dense_official_computation(grid, guide, size):
    naf = randomized(NAF(**SMALL, kernel_size=3))
    features, image = inputs(grid=grid, guide=guide)
    with torch.no_grad():
        torch.testing.assert_close(
            naf(features, image, size), reference_naf(naf, features, image, size), atol=2e-5, rtol=1e-4
        )


def test_naf_at_the_published_configuration_equals_the_dense_computation():
    naf = randomized(NAF(), seed=3)
    features, image = inputs(channels=12, grid=(9, 10), guide=(36, 40), batch=1)
    with torch.no_grad():
        out = naf(features, image, (18, 20))
        torch.testing.assert_close(out, reference_naf(naf, features, image, (18, 20)), atol=2e-5, rtol=1e-4)


def test_pooled_rows_equal_the_whole_adaptive_pooling():
    x = torch.randn(2, 4, 17, 13)
    for size in ((40, 9), (5, 30), (17, 13)):
        whole = F.adaptive_avg_pool2d(x, size)
        for start, stop in ((0, size[0]), (1, 3), (size[0] - 1, size[0])):
            torch.testing.assert_close(pooled_rows(x, size, start, stop), whole[:, :, start:stop])


def test_shapes_at_the_native_and_other_sizes():
    naf = get_upsampler_class("naf").from_features(8, 8, **SMALL).eval()
    assert isinstance(naf, NAF) and naf.capabilities.backbones == "any"
    features, image = inputs(grid=(4, 5), guide=(32, 40))
    assert naf.native_output_size((4, 5)) == (32, 40)
    with torch.no_grad():
        for size in ((32, 40), (8, 10), (7, 33), (1, 1)):
            assert naf(features, image, size).shape == (2, 8, *size)
        assert naf(features[:, :4], image, (8, 10)).shape == (2, 4, 8, 10)  # any channel count


def test_chunked_equals_unchunked_for_every_chunk_size():
    features, image = inputs(grid=(5, 6), guide=(40, 48))
    size = (15, 18)  # 3x: runs of 3 rows; 40 pixels is 2 rows, a non-divisor of 15 and of the runs
    whole = randomized(NAF(**SMALL, chunk_size=15 * 18))
    with torch.no_grad():
        expected = whole(features, image, size)
        for chunk in (1, 40, 15 * 18 * 4):
            naf = NAF(**SMALL, chunk_size=chunk)
            naf.load_state_dict(whole.state_dict())
            torch.testing.assert_close(naf.eval()(features, image, size), expected, atol=1e-6, rtol=1e-5)


def test_output_dtype_float16_is_written_chunk_by_chunk():
    features, image = inputs(grid=(5, 6), guide=(40, 48))
    naf = randomized(NAF(**SMALL, chunk_size=18))
    half = NAF(**SMALL, chunk_size=18, output_dtype="float16")
    half.load_state_dict(naf.state_dict())
    with torch.no_grad():
        expected = naf(features, image, (15, 18))
        out = half.eval()(features, image, (15, 18))
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, expected.half(), atol=2e-3, rtol=2e-3)
    with pytest.raises(ValueError, match="NAF output_dtype 'int8'"):
        NAF(output_dtype="int8")


def test_peak_memory_stays_near_the_budget_at_a_large_output():
    torch.manual_seed(0)
    features, image = torch.randn(1, 64, 16, 16), torch.randn(1, 3, 64, 64)
    size = (256, 256)  # 16x: a chunk of one row holds 16 x 256 x 81 scores per head
    output_mib = 64 * 256 * 256 * 4 / 2**20  # 16 MiB
    budget = 8.0
    small = NAF(max_memory_mib=budget).eval()
    peak = peak_memory_mib(lambda: small(features, image, size))
    # besides the chunks: the output, the guide's encoding at 64 px (4 MiB) and the [D, H, w] key pooling (4 MiB)
    assert peak < output_mib + 2 * budget, peak
    whole = NAF(chunk_size=256 * 256).eval()
    whole.load_state_dict(small.state_dict())
    assert peak_memory_mib(lambda: whole(features, image, size)) > output_mib + 20 * budget


def test_gradients_reach_every_parameter():
    naf = NAF(**SMALL).train()
    features, image = inputs(grid=(4, 4), guide=(32, 32))
    out = naf(features, image, (8, 8))
    (out * torch.randn_like(out)).sum().backward()
    for name, parameter in naf.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_training_rescales_the_rope_coordinates_and_eval_does_not():
    naf = randomized(NAF(**SMALL, kernel_size=3))
    features, image = inputs(grid=(4, 4), guide=(32, 32))
    with torch.no_grad():
        evaluated = naf(features, image, (8, 8))
        torch.manual_seed(5)
        trained = naf.train()(features, image, (8, 8))
        torch.manual_seed(5)
        scale = float(torch.empty(1).uniform_(-math.log(2), math.log(2)).exp())
        naf.eval()
        torch.testing.assert_close(
            trained, reference_naf(naf, features, image, (8, 8), rope_scale=scale), atol=2e-5, rtol=1e-4
        )
    assert not torch.allclose(trained, evaluated, atol=1e-4)
    assert NAF(**SMALL, rope_rescale=None).train().rotary.draw_scale() == 1.0


def test_bad_input_is_refused_naming_the_value():
    naf = NAF(**SMALL).eval()
    features, image = inputs(channels=6, grid=(4, 4), guide=(32, 32))
    with pytest.raises(InputSizeError, match="6 channels over its 4 attention heads"):
        naf(features, image, (8, 8))
    with pytest.raises(InputSizeError, match="needs a guide image"):
        naf(features[:, :4], None, (8, 8))
    with pytest.raises(InputSizeError, match="batch sizes differ"):
        naf(features[:, :4], image[:1], (8, 8))
    with pytest.raises(InputSizeError, match="output_size"):
        naf(features[:, :4], image, (0, 8))
    for args, message in (
        ({"dim": 24}, "multiple of 16"),
        ({"attention_heads": 3}, "attention_heads must divide dim 256"),
        ({"kernel_size": 4}, "kernel_size must be odd"),
        ({"rope_heads": 3}, "multiple of 4 x rope_heads"),
        ({"rope_rescale": 0.5}, "rope_rescale must be >= 1"),
        ({"chunk_size": 0}, "NAF chunk_size must be >= 1"),
        ({"max_memory_mib": -1.0}, "NAF max_memory_mib must be > 0"),
    ):
        with pytest.raises(ValueError, match=message):
            NAF(**args)
