"""UPLiFT: the Local Attender against a naive loop, convex outputs, shapes, row bands equal to one band in
bounded memory, BN folding, gradients, the parameter count of the official DINOv2-S/14 configuration, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from featlift.errors import InputSizeError
from featlift.meters import peak_memory_mib
from featlift.speedups import fold_batchnorm
from featlift.upsamplers import create_upsampler, get_upsampler_class
from featlift.upsamplers.local_attender import NEIGHBOURHOODS, LocalAttender
from featlift.upsamplers.uplift import UPLiFT, bilinear_2x_rows, convert_original_state_dict, nearest_indices


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def naive_attend(attender: LocalAttender, guide: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The Local Attender pixel by pixel, written from its definition."""
    batch, channels, height, width = values.shape
    out_h, out_w = guide.shape[-2:]
    factor = out_h // height
    weight = attender.logits.weight[:, :, 0, 0]
    out = torch.zeros(batch, channels, out_h, out_w, dtype=torch.float64)
    for b in range(batch):
        for y in range(out_h):
            for x in range(out_w):
                g = guide[b, :, y, x].double()
                logits = weight.double() @ g + attender.logits.bias.double()
                shared = min(len(g), len(logits))
                logits[:shared] += g[:shared]
                a = torch.softmax(logits, dim=0)
                for d, (dy, dx) in enumerate(attender.offsets):
                    row = min(max(y // factor + dy, 0), height - 1)
                    col = min(max(x // factor + dx, 0), width - 1)
                    out[b, :, y, x] += a[d] * values[b, :, row, col].double()
    return out


def small(channels: int = 8, patch: int = 16, **options) -> UPLiFT:
    torch.manual_seed(0)
    module = UPLiFT(channels=channels, patch_size=patch, **options)
    with torch.no_grad():  # BN statistics and affine maps that are not the identity, as after training
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return module.eval()


def test_the_17_offsets_are_the_originals():
    assert NEIGHBOURHOODS[17] == (
        (-2, -2), (-2, 0), (-2, 2), (-1, -1), (-1, 0), (-1, 1), (0, -2), (0, -1), (0, 0),
        (0, 1), (0, 2), (1, -1), (1, 0), (1, 1), (2, -2), (2, 0), (2, 2),
    )  # fmt: skip
    assert [len(offsets) for offsets in NEIGHBOURHOODS.values()] == list(NEIGHBOURHOODS)


@pytest.mark.parametrize("neighbourhood,guide_channels,factor", [(17, 20, 2), (5, 3, 3), (25, 8, 2)])
def test_local_attender_equals_a_naive_loop(neighbourhood, guide_channels, factor):
    torch.manual_seed(1)
    attender = LocalAttender(guide_channels, neighbourhood)
    values = torch.randn(2, 3, 4, 5)
    guide = torch.randn(2, guide_channels, 4 * factor, 5 * factor)
    with torch.no_grad():
        out = attender(guide, values)
    torch.testing.assert_close(out.double(), naive_attend(attender, guide, values), atol=1e-5, rtol=1e-5)


def test_local_attender_on_row_bands_gives_the_rows_of_the_whole_map():
    torch.manual_seed(2)
    attender = LocalAttender(6)
    values, guide = torch.randn(1, 4, 9, 7), torch.randn(1, 6, 18, 14)
    with torch.no_grad():
        whole = attender(guide, values)
        for row0, row1 in ((0, 4), (6, 10), (14, 18)):
            first, last = max(0, row0 // 2 - 2), min(9, row1 // 2 + 2)
            band = attender(guide[:, :, row0:row1], values[:, :, first:last], row0, first, 9)
            torch.testing.assert_close(band, whole[:, :, row0:row1], atol=1e-6, rtol=1e-6)
    with pytest.raises(InputSizeError, match=r"output rows 6..10 need value rows 1..7 of 9, got rows 2..7"):
        attender(guide[:, :, 6:10], values[:, :, 2:7], 6, 2, 9)


def test_every_output_is_a_convex_combination_of_the_input_features():
    module = small()
    torch.manual_seed(3)
    features, guide = torch.randn(2, 8, 3, 5) * 4, torch.randn(2, 3, 48, 80)
    with torch.no_grad():
        weights = module.attender.weights(torch.randn(2, 64, 6, 10) * 10)
        out = module(features, guide, (24, 40))  # three steps
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(2, 6, 10))
    assert weights.min() >= 0
    low = features.amin(dim=(2, 3), keepdim=True)
    high = features.amax(dim=(2, 3), keepdim=True)
    assert (out >= low - 1e-5).all() and (out <= high + 1e-5).all()
    assert out.std() > 0.1  # not a constant that trivially stays in range


@pytest.mark.parametrize("patch,grid,iters", [(14, (2, 3), 1), (16, (3, 2), 2), (8, (2, 2), 3)])
def test_shapes_for_any_patch_and_number_of_steps(patch, grid, iters):
    module = small(patch=patch, iters=iters)
    features = torch.randn(1, 8, *grid)
    guide = torch.randn(1, 3, grid[0] * patch, grid[1] * patch)
    native = module.native_output_size(grid)
    assert native == (grid[0] * 2**iters, grid[1] * 2**iters)
    with torch.no_grad():
        assert module(features, guide, native).shape == (1, 8, *native)
        assert module(features, guide, (5, 7)).shape == (1, 8, 5, 7)  # resized from the native map


def reference_steps(module: UPLiFT, features: torch.Tensor, guide: torch.Tensor, passes: int) -> list:
    """UPLiFT written from the original's description with whole-map torch ops (its resizes, its residuals)."""
    if module.patch_size == 14:
        guide = F.interpolate(
            guide, size=(guide.shape[2] * 16 // 14, guide.shape[3] * 16 // 14), mode="bilinear"
        )
    x, encoded = guide, []
    for block in module.image_encoder:
        out = block.layers(x)
        encoded.append(out + F.pad(x, (0, 0, 0, 0, 0, out.shape[1] - x.shape[1])))  # input zero-padded
        x = encoded[-1]
    e4, e3 = encoded[-1], encoded[-2]
    outputs, x = [], features
    for _ in range(passes):
        h, w = x.shape[-2:]
        merged = torch.cat([x, F.interpolate(e4, size=(h, w), mode="nearest")], dim=1)
        y = module.coarse_fuse.layers(merged) + merged[:, :64]  # the first 64 input channels
        u = module.up(y) + F.interpolate(y, scale_factor=2, mode="bilinear", align_corners=True)
        merged = torch.cat([u, F.interpolate(e3, size=(2 * h, 2 * w), mode="nearest")], dim=1)
        g = module.fine_fuse.layers(merged) + merged[:, :64]
        logits = module.attender.logits(g)
        weights = torch.softmax(logits + g[:, : logits.shape[1]], dim=1)
        padded = F.pad(x, (2, 2, 2, 2), mode="replicate")
        out = 0
        for d, (dy, dx) in enumerate(module.attender.offsets):
            shifted = padded[:, :, 2 + dy : 2 + dy + h, 2 + dx : 2 + dx + w]
            out = out + weights[:, d : d + 1] * shifted.repeat_interleave(2, 2).repeat_interleave(2, 3)
        outputs.append(out)
        x = out
    return outputs


@pytest.mark.parametrize("patch,grid", [(14, (2, 3)), (16, (3, 2))])
def test_steps_equal_the_method_written_with_whole_map_torch_ops(patch, grid):
    module = small(patch=patch)
    torch.manual_seed(6)
    features, guide = torch.randn(2, 8, *grid), torch.randn(2, 3, grid[0] * patch, grid[1] * patch)
    with torch.no_grad():
        expected = reference_steps(module, features, guide, 3)
        for got, want in zip(module.upsample_steps(features, guide, 3), expected, strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        module.chunk_size = 2 * grid[1] * 8  # bands of two rows of the 8x output
        torch.testing.assert_close(
            module(features, guide, (8 * grid[0], 8 * grid[1])), expected[-1], atol=1e-5, rtol=1e-5
        )


def test_steps_follow_the_output_size_and_reuse_one_encoding_of_the_guide():
    module = small()
    features, guide = torch.randn(1, 8, 2, 3), torch.randn(1, 3, 32, 48)
    assert [module.passes_for((2, 3), size) for size in (None, (4, 6), (5, 6), (16, 24))] == [1, 1, 2, 3]
    with torch.no_grad():
        steps = module.upsample_steps(features, guide, 3)
        assert [tuple(s.shape[-2:]) for s in steps] == [(4, 6), (8, 12), (16, 24)]
        torch.testing.assert_close(module(features, guide, (16, 24)), steps[-1], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(module(features, guide, (8, 12)), steps[1], atol=1e-6, rtol=1e-6)


def test_encoder_resampling_is_torchs_nearest_and_the_residual_its_align_corners_bilinear():
    for size_in, size_out in ((16, 4), (16, 6), (5, 40), (7, 7)):
        positions = torch.arange(size_in, dtype=torch.float32).view(1, 1, size_in, 1)
        expected = F.interpolate(positions, size=(size_out, 1), mode="nearest").view(-1).long()
        assert torch.equal(nearest_indices(size_in, size_out, torch.device("cpu")), expected)
    torch.manual_seed(4)
    x = torch.randn(1, 3, 7, 5)
    whole = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
    torch.testing.assert_close(bilinear_2x_rows(x, 0, 7), whole, atol=1e-6, rtol=1e-6)
    # a band: its inner rows are those of the whole enlargement
    torch.testing.assert_close(
        bilinear_2x_rows(x[:, :, 2:6], 2, 7)[:, :, 1:-1], whole[:, :, 5:11], atol=1e-6, rtol=1e-6
    )


def test_row_bands_equal_one_band_at_every_band_size():
    module = small()
    torch.manual_seed(5)
    features, guide = torch.randn(2, 8, 3, 4), torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        whole = module(features, guide, (24, 32))
        for chunk in (32 * 2, 32 * 6, 32 * 10):  # 2, 6 and 10 output rows per band (8 rows is no divisor)
            module.chunk_size = chunk
            assert module.band_rows(module.prepare_steps(features, guide, 3)) == chunk // 32
            torch.testing.assert_close(module(features, guide, (24, 32)), whole, atol=1e-5, rtol=1e-5)
        module.chunk_size, module.max_memory_mib = None, 1e-4  # a budget below one band: the smallest bands
        assert module.band_rows(module.prepare_steps(features, guide, 3)) == 2
        torch.testing.assert_close(module(features, guide, (24, 32)), whole, atol=1e-5, rtol=1e-5)


def test_float16_output_is_the_float32_output_rounded():
    features, guide = torch.randn(1, 8, 2, 2), torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        full = small(chunk_size=32)(features, guide, (16, 16))
        half = small(chunk_size=32, output_dtype="float16")(features, guide, (16, 16))
    assert half.dtype == torch.float16 and full.dtype == torch.float32
    torch.testing.assert_close(half, full.half(), atol=0, rtol=0)


def test_working_memory_beyond_the_output_stays_within_the_budget():
    features, guide = torch.randn(1, 16, 2, 2), torch.randn(1, 3, 32, 32)
    output_mib = 16 * 128 * 128 * 4 / 2**20  # six steps to 128^2
    beyond = {}
    for budget in (10, 1000):
        module = small(channels=16, max_memory_mib=budget)
        beyond[budget] = peak_memory_mib(lambda m=module: m(features, guide, (128, 128))) - output_mib
    # the budget bounds the bands and what the guide's encoding adds (1 MiB at 32 px); in one band the
    # decoder's tensors at 128^2 (the fine convs' 192-channel input alone: 12 MiB) are all live
    assert beyond[10] <= 10 + 1 and beyond[1000] > 20, beyond


def test_folded_batchnorm_gives_the_same_output_in_eval_mode():
    module = small()
    folded = fold_batchnorm(module)
    assert folded.folded_batchnorms == 9  # 5 encoder blocks, 2 + 2 in the decoder
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    features, guide = torch.randn(1, 8, 3, 3), torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        expected = module(features, guide, (12, 12))
        torch.testing.assert_close(folded(features, guide, (12, 12)), expected, atol=1e-5, rtol=1e-5)
        channels_last = folded.to(memory_format=torch.channels_last)
        out = channels_last(features.contiguous(memory_format=torch.channels_last), guide, (12, 12))
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        assert (expected - module(features, guide * 0.5, (12, 12))).abs().max() > 1e-3  # the guide matters


def test_gradients_reach_every_parameter_in_training_mode():
    module = small().train()
    features, guide = torch.randn(2, 8, 2, 3), torch.randn(2, 3, 32, 48)
    module(features, guide, (8, 12)).square().mean().backward()
    missing = [name for name, p in module.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_parameter_count_at_the_official_dinov2_s14_configuration():
    module = UPLiFT(channels=384, patch_size=14)
    parts = {
        name: sum(p.numel() for p in getattr(module, name).parameters())
        for name in ("image_encoder", "coarse_fuse", "up", "fine_fuse", "attender")
    }
    assert parts == {"image_encoder": 283_904, "coarse_fuse": 336_192, "up": 16_448, "fine_fuse": 151_872,
                     "attender": 1_105}  # fmt: skip
    assert sum(p.numel() for p in module.parameters()) == 789_521  # the original's config: ~0.8 M
    assert sum(p.numel() for p in UPLiFT(channels=768, patch_size=14).parameters()) == 789_521 + 384 * 64 * 9


def test_patch_14_guides_are_encoded_at_16_pixels_per_token():
    module = small(patch=14)
    coarse, fine = module.encode_guide(torch.randn(1, 3, 28, 42))
    assert coarse.shape == (1, 128, 32, 48) and fine.shape == (1, 128, 32, 48)
    assert small(patch=16).encode_guide(torch.randn(1, 3, 32, 48))[0].shape == (1, 128, 32, 48)


def test_bad_inputs_are_refused_clearly():
    module = small()
    features, guide = torch.randn(1, 8, 2, 2), torch.randn(1, 3, 32, 32)
    with pytest.raises(InputSizeError, match="UPLiFT was built for 8 channels, got features with 5"):
        module(features[:, :5], guide, (4, 4))
    with pytest.raises(InputSizeError, match="needs a guide image"):
        module(features, None, (4, 4))
    with pytest.raises(InputSizeError, match=r"guide: expected \[B, 3, H, W\], got \[1, 1, 32, 32\]"):
        module(features, guide[:, :1], (4, 4))
    with pytest.raises(ValueError, match="UPLiFT iters must be >= 1"):
        UPLiFT(8, 16, iters=0)
    with pytest.raises(ValueError, match="UPLiFT chunk_size must be >= 1"):
        UPLiFT(8, 16, chunk_size=0)
    with pytest.raises(ValueError, match="UPLiFT output_dtype 'int8': expected one of"):
        UPLiFT(8, 16, output_dtype="int8")
    with pytest.raises(ValueError, match="LocalAttender neighbourhood 7: expected one of 5, 9, 13, 17, 25"):
        LocalAttender(8, 7)
    with pytest.raises(InputSizeError, match="guide width 9 must be a whole multiple of the values' width 4"):
        LocalAttender(8)(torch.randn(1, 8, 8, 9), torch.randn(1, 3, 4, 4))


def test_registered_with_its_capabilities_and_options():
    cls = get_upsampler_class("uplift")
    assert (
        cls is UPLiFT
        and cls.capabilities.guide == "input"
        and cls.capabilities.output_sizes == "power-of-two"
    )
    assert cls.capabilities.objective == "uplift"
    assert cls.options == ("iters", "chunk_size", "max_memory_mib", "output_dtype")
    module = create_upsampler("uplift", channels=8, patch_size=16, iters=2, chunk_size=64)
    assert module.config() == {"channels": 8, "patch_size": 16} and module.native_output_size((4, 6)) == (
        16,
        24,
    )
    assert UPLiFT.from_features(32, 14).config() == {"channels": 32, "patch_size": 14}


def original_keys() -> list[str]:
    """The state-dict keys of the original's UPLiFT at its DINOv2-S/14 config, from its module structure:
    SingleConv = conv.0 (3x3), conv.1 (BN), conv.3 (1x1); DoubleConv = conv.0, conv.1, conv.3, conv.4, conv.6."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    single = ["conv.0.weight", *(f"conv.1.{n}" for n in bn), "conv.3.weight", "conv.3.bias"]
    double = ["conv.0.weight", *(f"conv.1.{n}" for n in bn), "conv.3.weight", *(f"conv.4.{n}" for n in bn),
              "conv.6.weight", "conv.6.bias"]  # fmt: skip
    keys = [f"encoder.block_{i}.blocks.0.{k}" for i in range(5) for k in single]
    keys += [f"decoder.block_0.blocks.0.{k}" for k in double] + [
        "decoder.up_1.up.weight",
        "decoder.up_1.up.bias",
    ]
    keys += [f"decoder.block_1.blocks.0.{k}" for k in double] + [
        "attender.conv1.weight",
        "attender.conv1.bias",
    ]
    return keys


def test_an_original_state_dict_loads_after_renaming_its_keys():
    module = UPLiFT(channels=384, patch_size=14)
    ours = module.state_dict()
    renamed = convert_original_state_dict({f"module.{k}": k for k in original_keys()})
    assert sorted(renamed) == sorted(ours)
    assert renamed["attender.logits.weight"] == "attender.conv1.weight"
    assert renamed["coarse_fuse.layers.4.running_var"] == "decoder.block_0.blocks.0.conv.4.running_var"
