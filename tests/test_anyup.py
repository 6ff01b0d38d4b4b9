"""AnyUp: equal to the official code with both official checkpoints on every stored reference case; any
channel count; windowed attention; chunked computation equal to one chunk, bounded in memory; float16 output;
bad input and wrong checkpoints."""

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
from featlift.upsamplers import get_upsampler_class
from featlift.upsamplers.anyup import OFFICIAL_BACKBONE, AnyUp, from_official, window_bounds

CHECKPOINTS = {"anyup_paper": "anyup_paper.pth", "anyup_multi_backbone": "anyup_multi_backbone.pth"}
CASES = [(name, case) for name in CHECKPOINTS for case in reference_cases(name)] or [
    ("anyup_paper", "absent")
]


@pytest.fixture(scope="module")
def officials():
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    return {}


def official(officials, name):
    if name not in officials:
        officials[name] = from_official(*official_checkpoint(CHECKPOINTS[name]))
    return officials[name]


@pytest.mark.parametrize(("name", "case"), CASES)
def test_equals_the_official_code_on_every_reference_case(officials, name, case):
    if not requires_peer(f"weights/peers/{CHECKPOINTS[name]}", f"peers/reference/{name}.safetensors").args[0]:
        features, guide, size = case_inputs(case)
        with torch.no_grad():
            assert_matches_reference(official(officials, name)(features, guide, size), load(name), case)
    else:
        pytest.skip(f"{CHECKPOINTS[name]} or reference/{name}.safetensors not in ../shared")


@requires_peer("weights/peers/anyup_paper.pth")
@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_the_official_checkpoints_load_with_the_default_configuration(officials, name):
    state, _ = official_checkpoint(CHECKPOINTS[name])
    module = official(officials, name)
    assert len(state) == 73 and sum(t.numel() for t in state.values()) == 878_080
    assert sum(p.numel() for p in module.parameters()) == 878_080
    assert module.config() == AnyUp().config() and not module.training and OFFICIAL_BACKBONE == "any"


def test_parameter_count_is_the_official_one_for_any_channel_count():
    assert sum(p.numel() for p in AnyUp().parameters()) == 878_080
    assert AnyUp.from_features(768, 16).config() == {**AnyUp().config(), "patch_size": 16}


def small(seed: int = 0, **options) -> AnyUp:
    torch.manual_seed(seed)
    module = AnyUp(qk_dim=16, num_heads=4, patch_size=14, **options).eval()
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)
    return module


def small_inputs(channels=8, grid=(6, 7), batch=2, seed=1):
    torch.manual_seed(seed)
    return torch.randn(batch, channels, *grid), torch.randn(batch, 3, grid[0] * 14, grid[1] * 14)


def test_any_channel_count_gives_that_many_output_channels():
    module = small()
    with torch.no_grad():
        for channels in (3, 8, 50):
            features, guide = small_inputs(channels)
            assert module(features, guide, (9, 11)).shape == (2, channels, 9, 11)


def test_each_output_pixel_sees_only_the_tokens_of_its_window():
    module = small(chunk_size=37)
    features, guide = small_inputs(grid=(10, 10), batch=1)
    bounds = window_bounds(20, 10, 0.1)
    assert bounds[0].tolist() == [0, 2] and bounds[10].tolist() == [4, 7] and bounds[19].tolist() == [8, 10]
    recorded = []
    weights = module.attention.weights
    module.attention.weights = lambda *args: recorded.append(weights(*args)) or recorded[-1]
    with torch.no_grad():
        module(features, guide, (20, 20))
    seen = torch.cat(recorded, dim=1)[0].view(20, 20, 10, 10)  # output row, column; token row, column
    assert len(recorded) == 11
    for row in range(20):
        for column in range(20):
            # the window: token t is seen when floor(clamp(c - 0.1) * 10) <= t < ceil(clamp(c + 0.1) * 10) for the
            # pixel centre c = (i + 0.5) / 20 of each axis (no centre falls on a boundary here)
            inside = torch.zeros(10, 10, dtype=torch.bool)
            lo = [max(0.0, (i + 0.5) / 20 - 0.1) * 10 for i in (row, column)]
            hi = [min(1.0, (i + 0.5) / 20 + 0.1) * 10 for i in (row, column)]
            inside[int(lo[0]) : -int(-hi[0] // 1), int(lo[1]) : -int(-hi[1] // 1)] = True
            weights_here = seen[row, column]
            assert (weights_here[~inside] == 0).all() and (weights_here[inside] > 0).all(), (row, column)
            torch.testing.assert_close(weights_here.sum(), torch.tensor(1.0))


def test_chunked_equals_one_chunk_at_every_chunk_size():
    features, guide = small_inputs()
    module = small()
    with torch.no_grad():
        for size, chunks in (((13, 17), (7, 17, 40)), ((5, 7), (1,))):  # a non-divisor, a row, rows; a pixel
            module.chunk_size = size[0] * size[1]
            whole = module(features, guide, size)
            for chunk in chunks:
                module.chunk_size = chunk
                torch.testing.assert_close(module(features, guide, size), whole, atol=1e-6, rtol=1e-6)
        module.chunk_size, module.max_memory_mib = None, 0.001
        torch.testing.assert_close(module(features, guide, size), whole, atol=1e-6, rtol=1e-6)


def test_float16_output_is_the_float32_output_rounded():
    features, guide = small_inputs()
    with torch.no_grad():
        full = small(chunk_size=50)(features, guide, (21, 19))
        half = small(chunk_size=50, output_dtype="float16")(features, guide, (21, 19))
    assert half.dtype == torch.float16
    torch.testing.assert_close(half, full.half(), atol=0, rtol=0)


def test_working_memory_beyond_the_output_stays_within_the_budget():
    torch.manual_seed(0)
    module = AnyUp(qk_dim=16, patch_size=14, max_memory_mib=24).eval()
    features, guide = torch.randn(1, 32, 16, 16), torch.randn(1, 3, 224, 224)
    beyond = {}
    for side in (16, 192, 512):
        output_mib = 32 * side * side * 4 / 2**20
        beyond[side] = peak_memory_mib(lambda s=side: module(features, guide, (s, s))) - output_mib
    # the guide's encoding is fixed; the budget bounds what the output adds, and it does not grow
    assert beyond[512] - beyond[16] <= 24 and beyond[192] - beyond[16] <= 24, beyond
    assert beyond[512] <= beyond[192] + 4, beyond


def test_bad_inputs_are_refused_clearly():
    module = small()
    features, guide = small_inputs()
    with pytest.raises(InputSizeError, match="needs a guide image"):
        module(features, None, (8, 8))
    with pytest.raises(InputSizeError, match=r"guide: expected \[B, 3, H, W\]"):
        module(features, guide[:, :2], (8, 8))
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        AnyUp(chunk_size=-3)
    with pytest.raises(ValueError, match="output_dtype 'half': expected one of"):
        AnyUp(output_dtype="half")
    with pytest.raises(ValueError, match="window_ratio must be > 0"):
        AnyUp(window_ratio=0)


def test_wrong_checkpoints_are_refused_naming_the_file():
    with pytest.raises(CheckpointError, match=r"a\.pth: expected an AnyUp state dict.*found list"):
        from_official([1, 2], "a.pth")
    jafar_like = {"jafar": {"sft_key.gamma.weight": torch.zeros(1)}}
    with pytest.raises(
        CheckpointError, match=r"a\.pth: expected an AnyUp state dict.*found a dict with keys jafar"
    ):
        from_official(jafar_like, "a.pth")
    with pytest.raises(CheckpointError, match="without key_features_encoder.0.basis.*looks like a JAFAR"):
        from_official(jafar_like["jafar"], "a.pth")


@requires_peer("weights/peers/anyup_paper.pth", "weights/peers/jafar_vit_small_patch14_dinov2.lvd142m.pth")
def test_damaged_official_checkpoints_are_refused_naming_the_tensor():
    state, _ = official_checkpoint("anyup_paper.pth")
    missing = {k: v for k, v in state.items() if k != "aggregation.1.block.3.weight"}
    with pytest.raises(
        CheckpointMismatchError, match=r"a\.pth: .*missing aggregation\.blocks\.0\.norm2\.weight"
    ):
        from_official(missing, "a.pth")
    nan = dict(state, **{"cross_decode.conv2d.weight": state["cross_decode.conv2d.weight"] * float("inf")})
    with pytest.raises(CheckpointError, match="NaN or infinite values in cross_decode.conv2d.weight"):
        from_official(nan, "a.pth")
    jafar, path = official_checkpoint("jafar_vit_small_patch14_dinov2.lvd142m.pth")
    with pytest.raises(CheckpointError, match="expected an AnyUp state dict"):
        from_official(jafar, path)


def test_registered_with_its_capabilities_and_options():
    cls = get_upsampler_class("anyup")
    assert cls is AnyUp and cls.capabilities.guide == "input" and cls.capabilities.output_sizes == "any"
    assert cls.capabilities.objective == "anyup" and cls.options == (
        "chunk_size",
        "max_memory_mib",
        "output_dtype",
    )
    module = AnyUp(chunk_size=5, max_memory_mib=3.0, output_dtype="float16")
    assert not {"chunk_size", "max_memory_mib", "output_dtype"} & set(module.config())
    assert module.native_output_size((16, 16)) == (224, 224)


def test_gradients_reach_every_parameter_the_output_depends_on():
    module = small(chunk_size=30)
    features, guide = small_inputs()
    module(features, guide, (9, 11)).square().mean().backward()
    unused = {name for name, p in module.named_parameters() if p.grad is None}
    assert unused == {
        name for name, p in module.named_parameters() if not p.requires_grad
    }  # frozen: DDP skips
    assert unused == {f"attention.{name}" for name in ("value_proj.weight", "value_proj.bias",
                      "output_proj.weight", "output_proj.bias")}  # fmt: skip
