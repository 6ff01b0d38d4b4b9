"""The upsampler contract: capabilities, ``forward(features, guide, output_size)``, LiFT's pass policy, registry."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from original_lift import ORIGINAL_LIFT_32_CHANNELS, original_lift_state

from featlift import InputSizeError, available_upsamplers, create_upsampler
from featlift.upsamplers import LiFT, Upsampler, get_upsampler_class, register_upsampler, registry
from featlift.upsamplers.base import Capabilities
from featlift.upsamplers.lift import convert_original_state_dict


@pytest.mark.parametrize("patch", [8, 14, 16])
@pytest.mark.parametrize("grid", [(4, 4), (3, 5)])
@pytest.mark.parametrize("iters", [1, 2, 3])
def test_lift_shapes_for_any_patch(patch, grid, iters):
    lift = LiFT(channels=16, patch_size=patch).eval()
    features = torch.randn(2, 16, *grid)
    image = torch.randn(2, 3, grid[0] * patch, grid[1] * patch)
    size = (grid[0] * 2**iters, grid[1] * 2**iters)
    assert lift(features, image, size).shape == (2, 16, *size)  # passes follow from the output size
    lift.iters = iters
    assert lift.native_output_size(grid) == size


def test_lift_passes_follow_from_the_output_size_unless_given():
    lift = LiFT(channels=8, patch_size=14)
    assert [lift.passes_for((4, 4), size) for size in [None, (8, 8), (9, 8), (16, 16), (4, 17), (3, 3)]] == [
        1, 1, 2, 2, 3, 1,
    ]  # fmt: skip
    assert LiFT(8, 14, iters=3).passes_for((4, 4), (8, 8)) == 3
    with pytest.raises(ValueError, match="iters must be >= 1"):
        LiFT(8, 14, iters=0)


def test_output_size_between_powers_of_two_resizes_the_larger_native_map():
    lift = LiFT(channels=8, patch_size=14, residual=True).eval()
    features, image = torch.randn(1, 8, 4, 4), torch.randn(1, 3, 56, 56)
    out = lift(features, image, (20, 30))  # 30 > 4 * 4: three passes to 32x32, then resized
    assert out.shape == (1, 8, 20, 30)
    three = lift(features, image, (32, 32))
    torch.testing.assert_close(out, F.interpolate(three, size=(20, 30), mode="bilinear", align_corners=False))


def test_capabilities_are_declared_and_checked():
    assert LiFT.capabilities == Capabilities(guide="input", output_sizes="power-of-two", objective="lift")
    assert LiFT.trainable and LiFT.options == ("iters",)
    bilinear = get_upsampler_class("bilinear")
    assert bilinear.capabilities.guide == "none" and not bilinear.trainable
    with pytest.raises(ValueError, match="guide 'pixels': expected one of none, input, output, source"):
        Capabilities(guide="pixels")
    with pytest.raises(ValueError, match="factor is given exactly when"):
        Capabilities(output_sizes="fixed")
    assert Capabilities(output_sizes="fixed", factor=4, fitting="per-image").trainable is False


def test_parameter_counts_match_the_paper():
    assert sum(p.numel() for p in LiFT(384, 14).parameters()) == 1_187_280  # ~1.19 M
    assert sum(p.numel() for p in LiFT(768, 16).parameters()) == 4_417_296  # ~4.42 M


def test_residual_lift_starts_as_bilinear():
    lift = LiFT(channels=8, patch_size=16, residual=True).eval()
    features = torch.randn(1, 8, 3, 4)
    out = lift(features, torch.randn(1, 3, 48, 64), (6, 8))
    expected = F.interpolate(features, scale_factor=2, mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, expected)


def test_output_scale_multiplies_every_pass():
    """An untrained residual LiFT is bilinear, so with a scale each pass is bilinear times the scale,
    and the second pass sees the scaled first output."""
    lift = LiFT(channels=8, patch_size=16, residual=True, output_scale=0.5).eval()
    features = torch.randn(1, 8, 3, 4)
    image = torch.randn(1, 3, 48, 64)
    once = F.interpolate(features, scale_factor=2, mode="bilinear", align_corners=False)
    twice = F.interpolate(once, scale_factor=2, mode="bilinear", align_corners=False)
    torch.testing.assert_close(lift(features, image, (6, 8)), 0.5 * once)
    torch.testing.assert_close(lift(features, image, (12, 16)), 0.25 * twice)
    assert lift.config()["output_scale"] == 0.5
    with pytest.raises(ValueError, match="output_scale must be > 0"):
        LiFT(8, 16, output_scale=0.0)


def test_iterative_passes_use_a_2x_guide_image_each_time():
    seen = []

    class Recorder(LiFT):
        def upsample_2x(self, features, image):
            seen.append((tuple(features.shape[-2:]), tuple(image.shape[-2:])))
            return F.interpolate(features, scale_factor=2)

    Recorder(4, 16, iters=3)(torch.randn(1, 4, 4, 4), torch.randn(1, 3, 64, 64), (32, 32))
    assert seen == [((4, 4), (64, 64)), ((8, 8), (128, 128)), ((16, 16), (256, 256))]


def test_bilinear_is_one_step_interpolation():
    bilinear = create_upsampler("bilinear", iters=2)
    features = torch.randn(1, 4, 5, 6)
    assert bilinear.native_output_size((5, 6)) == (20, 24)
    out = bilinear(features, None, (20, 24))
    torch.testing.assert_close(
        out, F.interpolate(features, size=(20, 24), mode="bilinear", align_corners=False)
    )
    assert bilinear(features, None, (5, 6)) is features


def test_bad_inputs_are_refused_clearly():
    lift = LiFT(channels=8, patch_size=16)
    with pytest.raises(InputSizeError, match="LiFT was built for 8 channels, got features with 4"):
        lift(torch.randn(1, 4, 4, 4), torch.randn(1, 3, 64, 64), (8, 8))
    with pytest.raises(InputSizeError, match="too small"):
        lift(torch.randn(1, 8, 8, 8), torch.randn(1, 3, 32, 32), (16, 16))
    with pytest.raises(InputSizeError, match="batch sizes differ"):
        lift(torch.randn(2, 8, 4, 4), torch.randn(1, 3, 64, 64), (8, 8))
    with pytest.raises(InputSizeError, match=r"guide: expected \[B, 3, H, W\]"):
        lift(torch.randn(1, 8, 4, 4), torch.randn(1, 1, 64, 64), (8, 8))
    with pytest.raises(InputSizeError, match="needs a guide image"):
        lift(torch.randn(1, 8, 4, 4), None, (8, 8))
    with pytest.raises(InputSizeError, match=r"output_size: expected \(height, width\) >= 1"):
        lift(torch.randn(1, 8, 4, 4), torch.randn(1, 3, 64, 64), (0, 8))


def test_registry_adds_a_method_by_decorating_one_class():
    assert {"bilinear", "lift"} <= set(available_upsamplers())

    @register_upsampler("nearest_for_test")
    class Nearest(Upsampler):
        capabilities = Capabilities(guide="none", fitting="none")

        def forward(self, features, guide, output_size):
            return F.interpolate(features, size=output_size, mode="nearest")

    try:
        module = get_upsampler_class("nearest_for_test").from_features(channels=2, patch_size=16)
        assert module.name == "nearest_for_test" and not module.trainable
        assert module(torch.randn(1, 2, 3, 3), None, module.native_output_size((3, 3))).shape == (1, 2, 6, 6)
    finally:
        registry.UPSAMPLERS.unregister("nearest_for_test")
    with pytest.raises(Exception, match="unknown upsampler 'nope'"):
        create_upsampler("nope")


def test_original_lift_key_names_convert_to_ours():
    """The original code's keys (a literal table, `module.` prefixed) map onto every LiFT parameter, shapes equal."""
    converted = convert_original_state_dict(original_lift_state())
    assert sorted(converted) == sorted(ours for _, ours, _ in ORIGINAL_LIFT_32_CHANNELS)
    shapes = {name: tuple(value.shape) for name, value in LiFT(32, 16).state_dict().items()}
    assert shapes == {ours: shape for _, ours, shape in ORIGINAL_LIFT_32_CHANNELS}


def test_the_registry_refuses_what_is_no_upsampler_and_taken_names():
    with pytest.raises(
        Exception, match=r"upsampler 'plain': <class .*NotAnUpsampler'> is no subclass of Upsampler"
    ):

        @register_upsampler("plain")
        class NotAnUpsampler:
            pass

    with pytest.raises(Exception, match="upsampler 'lift' is already registered by LiFT"):

        @register_upsampler("lift")
        class Impostor(Upsampler):
            pass

    assert get_upsampler_class("lift") is LiFT
