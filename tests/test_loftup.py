"""LoftUp (`featlift.upsamplers.loftup`): the official architecture computed whole-map equals the chunked module,
its parameter count, sizes, chunks, output dtype, bounded memory, gradients and refused inputs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from featlift.errors import InputSizeError
from featlift.meters import peak_memory_mib
from featlift.upsamplers import create_upsampler, get_upsampler_class
from featlift.upsamplers.loftup import LoftUp


def small(channels: int = 12, **options) -> LoftUp:
    """A small LoftUp in eval mode whose BatchNorms have non-trivial running statistics."""
    torch.manual_seed(0)
    module = LoftUp(channels, patch_size=4, **options).eval()
    with torch.no_grad():
        for norm in (module.query_bn1, module.query_bn2):
            norm.running_mean.normal_()
            norm.running_var.uniform_(0.5, 2.0)
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_()
        module.feature_norm.weight.uniform_(0.5, 1.5)  # as a loaded ChannelNorm may be
        module.feature_norm.bias.normal_()
    return module


def inputs(channels: int = 12, grid=(3, 4), size=(13, 17), batch: int = 1):
    torch.manual_seed(1)
    return torch.randn(batch, channels, *grid), torch.randn(batch, 3, *size)


def sinusoids(values: list[torch.Tensor], biases: torch.Tensor, frequencies: int) -> list[torch.Tensor]:
    """The official ImplicitFeaturizer channel by channel: sin half then cos half, frequency-major, its
    ``[2, values, F]`` phases read as ``[F, values]`` row-major."""
    phases = biases.reshape(2, frequencies, len(values))
    exps = torch.exp(torch.linspace(-2, 10, frequencies))
    out = []
    for half, fn in enumerate((torch.sin, torch.cos)):
        for f in range(frequencies):
            for v, value in enumerate(values):
                out.append(fn(value * exps[f] + phases[half, f, v]))
    return out


def reference(module: LoftUp, features: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
    """The official ``UpsamplerwithChannelNorm(LoftUp)`` forward, written out whole-map for one image, with
    ``nn.MultiheadAttention`` called as the official CrossAttentionLayer calls it."""
    assert features.shape[0] == 1
    _, _, h, w = features.shape
    _, _, height, width = guide.shape
    normed = F.layer_norm(
        features.permute(0, 2, 3, 1), (module.channels,), module.feature_norm.weight, module.feature_norm.bias
    ).permute(0, 3, 1, 2)
    low = guide.amin(dim=(0, 2, 3), keepdim=True)
    scale = (guide.amax(dim=(0, 2, 3), keepdim=True) - low).clamp_min(1e-4)
    image = (guide - low) / scale - 0.5
    gy, gx = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
    colour = [image[0, c] for c in range(3)]
    encoded = torch.stack(
        sinusoids([gy, gx, *colour], module.query_encoding.biases, module.frequencies) + colour
    )[None]
    x = module.query_input_norm(encoded.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    x = F.relu(module.query_bn1(module.query_conv1(x)))
    x = F.relu(module.query_bn2(module.query_conv2(x)))
    queries = x.flatten(2).transpose(1, 2)
    ky, kx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    position = torch.stack(sinusoids([ky, kx], module.key_encoding.biases, 5))[None]
    tokens = torch.cat([normed, position], dim=1).flatten(2).transpose(1, 2)
    for block in module.blocks:
        q, kv = block.query_norm(queries), block.token_norm(tokens)
        attended, _ = block.attention(q.transpose(0, 1), kv.transpose(0, 1), kv.transpose(0, 1))
        queries = attended.transpose(0, 1) + queries
        queries = block.mlp_out(F.gelu(block.mlp_in(block.mlp_norm(queries)))) + queries
    out = module.output_proj(module.final_norm(queries))
    mean = out.mean(-1, keepdim=True)
    var = (out - mean).square().mean(-1, keepdim=True)
    out = (out - mean) / torch.sqrt(var + 1e-6) * module.output_norm.weight + module.output_norm.bias
    return out.transpose(1, 2).reshape(1, module.channels, height, width)


def test_the_parameter_count_at_the_official_dinov2_vits14_configuration():
    module = create_upsampler("loftup", channels=384, patch_size=14)
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    # official loftup_dinov2s: LoftUp(384) 4,303,126 + its input ChannelNorm(384) 768
    assert total == 4_303_894 and trainable == 4_303_126
    assert module.dim == 404 and module.query_encoding.channels == 203 and module.key_encoding.channels == 20
    caps = get_upsampler_class("loftup").capabilities
    assert caps.guide == "output" and caps.objective == "loftup" and caps.output_sizes == "any"


@pytest.mark.parametrize("chunk_size", [None, 1, 37])
def test_the_chunked_module_equals_the_official_architecture_computed_whole(chunk_size):
    module = small(chunk_size=chunk_size)
    features, guide = inputs()
    with torch.no_grad():
        expected = reference(module, features, guide)
        got = module(features, guide, (13, 17))
    assert got.shape == (1, 12, 13, 17)
    assert torch.allclose(got, expected, atol=2e-5, rtol=1e-4), (got - expected).abs().max()


@pytest.mark.parametrize("size", [(13, 17), (4, 4), (1, 1), (40, 9)])
def test_shapes_at_several_output_sizes_and_the_native_size(size):
    module = small()
    features, guide = inputs(batch=2)
    with torch.no_grad():
        out = module(features, F.interpolate(guide, size=size, mode="bilinear"), size)
        resized = module(features, guide, size)  # a guide of another size is resized to the output size
    assert out.shape == (2, 12, *size) and torch.isfinite(out).all()
    assert torch.allclose(out, resized, atol=1e-5)
    assert module.native_output_size((3, 4)) == (12, 16)


def test_batch_items_are_independent():
    module = small()
    features, guide = inputs(batch=2)
    with torch.no_grad():
        both = module(features, guide, (13, 17))
        second = module(features[1:], guide[1:], (13, 17))
    assert torch.allclose(both[1:], second, atol=1e-5)


def test_chunks_of_one_a_non_divisor_and_all_pixels_give_the_same_output():
    features, guide = inputs(batch=2)
    outputs = []
    for chunk in (1, 29, 13 * 17, None):
        module = small(chunk_size=chunk)
        with torch.no_grad():
            outputs.append(module(features, guide, (13, 17)))
    for out in outputs[1:]:
        assert torch.allclose(out, outputs[0], atol=1e-5), (out - outputs[0]).abs().max()


def test_training_mode_chunks_match_and_gradients_reach_every_trainable_parameter():
    features, guide = inputs(batch=2)
    results = []
    for chunk in (7, None):
        module = small(chunk_size=chunk).train()
        out = module(features, guide, (13, 17))
        out.square().mean().backward()
        results.append((out.detach(), {n: p.grad for n, p in module.named_parameters()}))
    (a, grads_a), (b, grads_b) = results
    assert torch.allclose(a, b, atol=1e-5)
    for name, grad in grads_a.items():
        if name.startswith("feature_norm."):
            assert grad is None  # frozen, as in the official training
            continue
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
        assert torch.allclose(grad, grads_b[name], atol=1e-5, rtol=1e-3), name


def test_output_dtype_float16_is_allocated_and_filled_chunk_by_chunk():
    features, guide = inputs()
    with torch.no_grad():
        full = small()(features, guide, (13, 17))
        half = small(chunk_size=29, output_dtype="float16")(features, guide, (13, 17))
    assert half.dtype == torch.float16
    assert torch.allclose(half.float(), full, atol=2e-3, rtol=2e-3)
    with pytest.raises(ValueError, match="LoftUp output_dtype 'int8'"):
        LoftUp(12, output_dtype="int8")


def test_working_memory_beyond_the_output_stays_within_a_small_budget():
    module = small(32, max_memory_mib=16)
    features = torch.randn(1, 32, 8, 8)
    beyond, output_mib = {}, {}
    for side in (64, 192):
        guide = torch.randn(1, 3, side, side)
        output_mib[side] = 32 * side * side * 4 / 2**20
        beyond[side] = peak_memory_mib(lambda s=side, g=guide: module(features, g, (s, s))) - output_mib[side]
    # the budget holds a chunk plus the halo rows of its query band; unchunked, 192^2 queries would need ~360 MiB
    assert beyond[192] <= 16, beyond
    # what grows is one row band and the min-max scaled guide (3 channels): far less than the 4 MiB more output
    assert beyond[192] - beyond[64] <= 0.5 * (output_mib[192] - output_mib[64]), beyond


def test_the_chunk_follows_the_budget():
    module = small(32)
    per_query = module.query_bytes(64, 4)
    assert per_query == 4 * (5 * 203 + 6 * 52 + 10 * 52 + 2 * 4 * 64 + 2 * 32 + 52 + 3 * 32)
    module.max_memory_mib = 64.0
    chunk = module.chunk_pixels(512 * 512, 512, 64, 4)
    halo_mib = 512 * (2 * 2 * (5 * 203 + 6 * 52) + 52) * 4 / 2**20
    assert chunk == math.floor((64.0 - halo_mib) * 2**20 / per_query)
    module.chunk_size = 100
    assert module.chunk_pixels(512 * 512, 512, 64, 4) == 100


def test_bad_inputs_are_refused_clearly():
    module = small()
    features, guide = inputs()
    with pytest.raises(InputSizeError, match="LoftUp was built for 12 feature channels, got features with 5"):
        module(features[:, :5], guide, (8, 8))
    with pytest.raises(InputSizeError, match="needs a guide image"):
        module(features, None, (8, 8))
    with pytest.raises(InputSizeError, match=r"guide: expected \[B, 3, H, W\], got \[1, 1, 13, 17\]"):
        module(features, guide[:, :1], (8, 8))
    with pytest.raises(InputSizeError, match="batch sizes differ: features 1, guide 2"):
        module(features, guide.expand(2, -1, -1, -1), (8, 8))
    with pytest.raises(InputSizeError, match="output_size"):
        module(features, guide, (0, 8))
    with pytest.raises(InputSizeError, match="floating point"):
        module(features.long(), guide, (8, 8))
    with pytest.raises(ValueError, match="LoftUp chunk_size must be >= 1 output pixels"):
        LoftUp(12, chunk_size=0)
    with pytest.raises(ValueError, match="LoftUp max_memory_mib must be > 0"):
        LoftUp(12, max_memory_mib=float("nan"))
    with pytest.raises(ValueError, match="LoftUp: the attention width 22 must be a multiple of heads 4"):
        LoftUp(2, heads=4)
    with pytest.raises(ValueError, match="LoftUp channels must be >= 1, got 0"):
        LoftUp(0)
