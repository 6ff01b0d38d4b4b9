"""JAFAR: equal to the official code with the official checkpoint on every stored reference case; chunked
computation equal to one chunk, bounded in memory; float16 output; bad input and wrong checkpoints."""

from __future__ import annotations

import pytest
import torch
from peer_reference import (
    assert_matches_reference,
    case_inputs,
    load,
    official_checkpoint,
    reference_cases,
    requires_peer,
)

from featlift.errors import CheckpointError, CheckpointMismatchError, InputSizeError
from featlift.meters import peak_memory_mib
from featlift.upsamplers import create_upsampler, get_upsampler_class
from featlift.upsamplers.jafar import JAFAR, OFFICIAL_BACKBONE, from_official

CHECKPOINT = "jafar_vit_small_patch14_dinov2.lvd142m.pth"
needs_checkpoint = requires_peer(f"weights/peers/{CHECKPOINT}", "peers/reference/jafar.safetensors")


@pytest.fixture(scope="module")
def official():
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    return from_official(*official_checkpoint(CHECKPOINT))


@needs_checkpoint
@pytest.mark.parametrize("case", reference_cases("jafar") or ["absent"])
def test_equals_the_official_code_on_every_reference_case(official, case):
    features, guide, size = case_inputs(case)
    with torch.no_grad():
        assert_matches_reference(official(features, guide, size), load("jafar"), case)


@needs_checkpoint
def test_the_official_checkpoint_loads_with_the_official_configuration(official):
    state, _ = official_checkpoint(CHECKPOINT)
    assert sum(t.numel() for t in state["jafar"].values()) == 628_480
    assert sum(p.numel() for p in official.parameters()) == 628_480
    assert official.config() == {
        "channels": 384,
        "qk_dim": 128,
        "num_heads": 4,
        "kernel_size": 1,
        "patch_size": 14,
    }
    assert not official.training and OFFICIAL_BACKBONE == "vit_small_patch14_dinov2.lvd142m"


def test_parameter_count_at_384_channels_is_the_official_one():
    assert sum(p.numel() for p in JAFAR(channels=384).parameters()) == 628_480


def small(seed: int = 0, **options) -> JAFAR:
    torch.manual_seed(seed)
    module = JAFAR(channels=8, qk_dim=16, num_heads=4, patch_size=14, **options).eval()
    with torch.no_grad():  # a random, non-trivial module: no group norm at identity
        for parameter in module.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)
    return module


def small_inputs(grid=(4, 5), batch=2, seed=1):
    torch.manual_seed(seed)
    return torch.randn(batch, 8, *grid), torch.randn(batch, 3, grid[0] * 14, grid[1] * 14)


def test_chunked_equals_one_chunk_at_every_chunk_size():
    features, guide = small_inputs()
    module = small()
    with torch.no_grad():
        for size, chunks in (((13, 17), (7, 17, 40)), ((5, 7), (1,))):  # a non-divisor, a row, rows; a pixel
            module.chunk_size = size[0] * size[1]
            whole = module(features, guide, size)
            assert whole.shape == (2, 8, *size)
            for chunk in chunks:
                module.chunk_size = chunk
                torch.testing.assert_close(module(features, guide, size), whole, atol=1e-6, rtol=1e-6)
        module.chunk_size, module.max_memory_mib = None, 0.001  # a budget below one row: one pixel at a time
        torch.testing.assert_close(module(features, guide, size), whole, atol=1e-6, rtol=1e-6)


def test_float16_output_is_the_float32_output_rounded():
    features, guide = small_inputs()
    with torch.no_grad():
        full = small(chunk_size=50)(features, guide, (21, 19))
        half = small(chunk_size=50, output_dtype="float16")(features, guide, (21, 19))
    assert half.dtype == torch.float16 and full.dtype == torch.float32
    torch.testing.assert_close(half, full.half(), atol=0, rtol=0)


def test_working_memory_beyond_the_output_stays_within_the_budget():
    torch.manual_seed(0)
    module = JAFAR(channels=32, qk_dim=16, patch_size=14, max_memory_mib=24).eval()
    features, guide = torch.randn(1, 32, 16, 16), torch.randn(1, 3, 224, 224)
    beyond = {}
    for side in (16, 192, 512):
        output_mib = 32 * side * side * 4 / 2**20
        beyond[side] = peak_memory_mib(lambda s=side: module(features, guide, (s, s))) - output_mib
    # the guide's encoding (~19 MiB at 224 px, qk_dim 16) is fixed; the budget bounds what the output adds
    assert beyond[512] - beyond[16] <= 24 and beyond[192] - beyond[16] <= 24, beyond
    assert beyond[512] <= beyond[192] + 4, beyond  # it does not grow with the output (32 MiB at 512^2)


def test_bad_inputs_are_refused_clearly():
    module = small()
    features, guide = small_inputs()
    with pytest.raises(InputSizeError, match="JAFAR was built for 8 feature channels, got features with 5"):
        module(features[:, :5], guide, (8, 8))
    with pytest.raises(InputSizeError, match="needs a guide image"):
        module(features, None, (8, 8))
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        JAFAR(channels=8, chunk_size=0)
    with pytest.raises(ValueError, match="max_memory_mib must be > 0"):
        JAFAR(channels=8, max_memory_mib=float("inf"))
    with pytest.raises(ValueError, match="output_dtype 'int8': expected one of float32, float16, bfloat16"):
        JAFAR(channels=8, output_dtype="int8")
    with pytest.raises(ValueError, match="qk_dim must be a multiple of 4 and of 8, got 12"):
        JAFAR(channels=8, qk_dim=12)


def test_wrong_checkpoints_are_refused_naming_the_file():
    with pytest.raises(CheckpointError, match=r"x\.pth: expected a JAFAR checkpoint.*found Tensor"):
        from_official(torch.zeros(3), "x.pth")
    with pytest.raises(
        CheckpointError, match=r"x\.pth: expected a JAFAR checkpoint.*found a dict with keys model"
    ):
        from_official({"model": {"a": 1}}, "x.pth")
    anyup_like = {
        "image_encoder.0.weight": torch.zeros(128, 3, 1, 1),
        "key_features_encoder.0.basis": torch.zeros(1),
    }
    with pytest.raises(CheckpointError, match="without sft_key.gamma.weight.*looks like an AnyUp checkpoint"):
        from_official(anyup_like, "anyup.pth")


@needs_checkpoint
def test_damaged_official_checkpoints_are_refused_naming_the_tensor():
    state, _ = official_checkpoint(CHECKPOINT)
    state = dict(state["jafar"])
    broken = dict(state, **{"cross_decode.conv2d.weight": torch.zeros(128, 128, 1, 1)})
    with pytest.raises(CheckpointMismatchError, match=r"j\.pth: .*query_mixer\.weight \[128, 128, 1, 1\]"):
        from_official({"jafar": broken}, "j.pth")
    extra = dict(state, **{"extra.weight": torch.zeros(1)})
    with pytest.raises(CheckpointMismatchError, match="unexpected extra.weight"):
        from_official(extra, "j.pth")  # a bare state dict is taken too
    nan = dict(state, **{"rope.freqs": torch.full((2, 128), float("nan"))})
    with pytest.raises(CheckpointError, match="NaN or infinite values in rope.freqs"):
        from_official({"jafar": nan}, "j.pth")
    anyup, path = official_checkpoint("anyup_paper.pth")
    with pytest.raises(CheckpointError, match="looks like an AnyUp checkpoint"):
        from_official(anyup, path)


def test_registered_with_its_capabilities_and_options():
    cls = get_upsampler_class("jafar")
    assert cls is JAFAR and cls.capabilities.guide == "input" and cls.capabilities.output_sizes == "any"
    assert cls.capabilities.objective == "jafar" and cls.options == (
        "chunk_size",
        "max_memory_mib",
        "output_dtype",
    )
    module = create_upsampler("jafar", channels=8, qk_dim=16, chunk_size=5)
    assert "chunk_size" not in module.config() and module.native_output_size((4, 6)) == (56, 84)
    assert JAFAR.from_features(32, 16).config()["patch_size"] == 16


def test_pipeline_gives_the_image_size_by_default(tiny_backbone):
    from featlift.pipeline import FeaturePipeline

    backbone = tiny_backbone(patch_size=16)
    pipeline = FeaturePipeline(
        backbone, JAFAR.from_features(backbone.channels, 16, qk_dim=16, chunk_size=100)
    )
    with torch.no_grad():
        out = pipeline(torch.rand(1, 3, 32, 48))
    assert out.shape == (1, backbone.channels, 32, 48) and pipeline.upsampler.chunk_size == 100


def test_gradients_reach_every_parameter_the_output_depends_on():
    module = small(chunk_size=30)
    features, guide = small_inputs()
    module(features, guide, (9, 11)).square().mean().backward()
    unused = {name for name, p in module.named_parameters() if p.grad is None}
    assert unused == {
        name for name, p in module.named_parameters() if not p.requires_grad
    }  # frozen: DDP skips
    assert unused == {f"attention.{name}" for name in ("value_proj.weight", "value_proj.bias",
                      "output_proj.weight", "output_proj.bias", "value_norm.weight")}  # fmt: skip
