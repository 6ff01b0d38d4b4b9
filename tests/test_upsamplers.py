"""Upsampler interface: shapes for any patch size, iterative passes, registry, residual LiFT."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from original_lift import ORIGINAL_LIFT_32_CHANNELS, original_lift_state

from featlift import (
    InputSizeError,
    LiFT,
    Upsampler,
    available_upsamplers,
    create_upsampler,
    register_upsampler,
)
from featlift.upsamplers import registry
from featlift.upsamplers.lift import convert_original_state_dict


@pytest.mark.parametrize("patch", [8, 14, 16])
@pytest.mark.parametrize("grid", [(4, 4), (3, 5)])
@pytest.mark.parametrize("iters", [1, 2, 3])
def test_lift_shapes_for_any_patch(patch, grid, iters):
    lift = LiFT(channels=16, patch_size=patch).eval()
    features = torch.randn(2, 16, *grid)
    image = torch.randn(2, 3, grid[0] * patch, grid[1] * patch)
    out = lift(features, image, iters=iters)
    assert out.shape == (2, 16, grid[0] * 2**iters, grid[1] * 2**iters)


def test_output_size_resizes_the_final_map():
    lift = LiFT(channels=8, patch_size=14).eval()
    out = lift(torch.randn(1, 8, 4, 4), torch.randn(1, 3, 56, 56), iters=2, output_size=(20, 30))
    assert out.shape == (1, 8, 20, 30)


def test_parameter_counts_match_the_paper():
    assert sum(p.numel() for p in LiFT(384, 14).parameters()) == 1_187_280  # ~1.19 M
    assert sum(p.numel() for p in LiFT(768, 16).parameters()) == 4_417_296  # ~4.42 M


def test_residual_lift_starts_as_bilinear():
    lift = LiFT(channels=8, patch_size=16, residual=True).eval()
    features = torch.randn(1, 8, 3, 4)
    out = lift(features, torch.randn(1, 3, 48, 64))
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
    torch.testing.assert_close(lift(features, image), 0.5 * once)
    torch.testing.assert_close(lift(features, image, iters=2), 0.25 * twice)
    assert lift.config()["output_scale"] == 0.5
    with pytest.raises(ValueError, match="output_scale must be > 0"):
        LiFT(8, 16, output_scale=0.0)


def test_iterative_passes_use_a_2x_guide_image_each_time():
    seen = []

    class Recorder(Upsampler):
        def upsample_once(self, features, image):
            seen.append((tuple(features.shape[-2:]), tuple(image.shape[-2:])))
            return F.interpolate(features, scale_factor=2)

    Recorder()(torch.randn(1, 4, 4, 4), torch.randn(1, 3, 64, 64), iters=3)
    assert seen == [((4, 4), (64, 64)), ((8, 8), (128, 128)), ((16, 16), (256, 256))]


def test_bilinear_is_one_step_interpolation():
    bilinear = create_upsampler("bilinear")
    features = torch.randn(1, 4, 5, 6)
    out = bilinear(features, torch.randn(1, 3, 80, 96), iters=2)
    torch.testing.assert_close(
        out, F.interpolate(features, size=(20, 24), mode="bilinear", align_corners=False)
    )
    assert bilinear(features, torch.randn(1, 3, 80, 96), iters=0) is features


def test_bad_inputs_are_refused_clearly():
    lift = LiFT(channels=8, patch_size=16)
    with pytest.raises(InputSizeError, match="LiFT was built for 8 channels, got features with 4"):
        lift(torch.randn(1, 4, 4, 4), torch.randn(1, 3, 64, 64))
    with pytest.raises(InputSizeError, match="too small"):
        lift(torch.randn(1, 8, 8, 8), torch.randn(1, 3, 32, 32))
    with pytest.raises(InputSizeError, match="batch sizes differ"):
        lift(torch.randn(2, 8, 4, 4), torch.randn(1, 3, 64, 64))
    with pytest.raises(InputSizeError, match=r"image: expected \[B, 3, H, W\]"):
        lift(torch.randn(1, 8, 4, 4), torch.randn(1, 1, 64, 64))


def test_registry_adds_a_method_by_decorating_one_class():
    assert {"bilinear", "lift"} <= set(available_upsamplers())

    @register_upsampler("nearest_for_test")
    class Nearest(Upsampler):
        def __init__(self, channels=None, patch_size=None):
            super().__init__()

        def upsample_once(self, features, image):
            return F.interpolate(features, scale_factor=2, mode="nearest")

    try:
        module = create_upsampler("nearest_for_test")
        assert module.name == "nearest_for_test"
        assert module(torch.randn(1, 2, 3, 3), torch.randn(1, 3, 48, 48)).shape == (1, 2, 6, 6)
    finally:
        registry._UPSAMPLERS.pop("nearest_for_test")
    with pytest.raises(Exception, match="unknown upsampler 'nope'"):
        create_upsampler("nope")


def test_original_lift_key_names_convert_to_ours():
    """The original code's keys (a literal table, `module.` prefixed) map onto every LiFT parameter, shapes equal."""
    converted = convert_original_state_dict(original_lift_state())
    assert sorted(converted) == sorted(ours for _, ours, _ in ORIGINAL_LIFT_32_CHANNELS)
    shapes = {name: tuple(value.shape) for name, value in LiFT(32, 16).state_dict().items()}
    assert shapes == {ours: shape for _, ours, shape in ORIGINAL_LIFT_32_CHANNELS}
