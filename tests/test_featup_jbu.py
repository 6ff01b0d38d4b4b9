"""FeatUp's JBU stack (`featlift.upsamplers.featup_jbu`): equal to the official code with the official checkpoint,
its tiled pure-PyTorch kernel application equal to a naive one, bounded memory, and clear errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import SHARED

from featlift.errors import CheckpointError, InputSizeError
from featlift.meters import peak_memory_mib
from featlift.upsamplers import get_upsampler_class
from featlift.upsamplers.featup_jbu import (
    OFFICIAL_BACKBONE,
    FeatUpJBU,
    channel_norm,
    from_official,
    reflected,
    upsampled_rows,
)
from featlift.upsamplers.pixel_kernels import apply_pixel_kernels, unfold_pixel_kernels
from featlift.weightfiles import read_weights_file

PEERS = SHARED / "weights" / "peers"
CHECKPOINT = PEERS / "featup_jbu_dinov2_cocostuff.ckpt"
REFERENCE = SHARED / "peers" / "reference"
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
requires_peers = pytest.mark.skipif(
    not (CHECKPOINT.is_file() and (REFERENCE / "featup_jbu.safetensors").is_file()),
    reason=f"the official FeatUp checkpoint or reference not found under {SHARED} (../shared is absent)",
)

# The official stack's output is within float32 noise of ours (measured max |diff| 2.1e-6 at values up to 4.2;
# the README of the references saw 3.1e-6 between 1 and 2 threads of the official code itself).
RELATIVE_TOLERANCE = 1e-5  # of the largest |value| of the reference pixels: ~4e-5 absolute here


@pytest.fixture(autouse=True)
def single_thread():
    """Small tensors run faster on one thread on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def naive_jbu(module: FeatUpJBU, features: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
    """The JBU stack written as the paper and the official code state it, all at once: whole-map bicubic
    upsampling and reflect padding, the range kernel and the kernel application by unfolding every 7x7
    neighbourhood. Slow and memory-hungry; the reference for the tiled module (eval mode)."""
    x = channel_norm(features) if module.use_norm else features
    for stage in module.stages:
        radius, taps = stage.radius, stage.taps
        height, width = 2 * x.shape[-2], 2 * x.shape[-1]
        small = F.adaptive_avg_pool2d(guide, (height, width))
        keys = stage.range_out(F.gelu(stage.range_in(small)))
        neighbours = F.unfold(F.pad(keys, [radius] * 4, mode="reflect"), 2 * radius + 1)
        neighbours = neighbours.reshape(keys.shape[0], keys.shape[1], taps, height, width)
        scores = torch.einsum("bcphw,bchw->bphw", neighbours, keys)
        temperature = stage.log_range_temperature.exp().clamp(1e-4, 1e4)
        kernel = torch.softmax(temperature * scores, 1) * stage.spatial_kernel()
        kernel = kernel / kernel.sum(1, keepdim=True).clamp(1e-7)
        kernel = kernel + 0.1 * stage.kernel_fixup_out(
            F.gelu(stage.kernel_fixup_in(torch.cat([kernel, small], 1)))
        )
        upsampled = F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False)
        x = unfold_pixel_kernels(F.pad(upsampled, [radius] * 4, mode="reflect"), kernel)
    return x + 0.1 * module.final_fixup(x)


def random_jbu(channels: int = 8, seed: int = 0, **options) -> FeatUpJBU:
    """A JBU stack with random weights large enough that every term matters (the fix-ups, the temperature)."""
    torch.manual_seed(seed)
    module = FeatUpJBU(channels=channels, **options)
    with torch.no_grad():
        for stage in module.stages:
            stage.log_range_temperature.fill_(0.5)
            stage.spatial_sigma.fill_(0.8)
            for conv in (stage.kernel_fixup_in, stage.kernel_fixup_out):
                conv.weight.mul_(3)
    return module.eval()


def test_registered_with_the_contracts_capabilities():
    module = get_upsampler_class("featup-jbu").from_features(384, 14)
    assert isinstance(module, FeatUpJBU)
    assert module.capabilities.factor == 16 and module.capabilities.guide == "input"
    assert module.capabilities.objective == "featup"
    assert module.native_output_size((16, 16)) == (256, 256)
    assert set(module.options) == {"chunk_size", "max_memory_mib", "output_dtype"}
    assert not set(module.options) & set(module.config())
    assert OFFICIAL_BACKBONE == "vit_small_patch14_dinov2.lvd142m"


def test_parameter_count_at_384_channels_is_the_official_one():
    assert sum(p.numel() for p in FeatUpJBU(channels=384).parameters()) == 172_772


def test_pixel_kernels_tap_by_tap_equal_the_unfold_in_float64():
    torch.manual_seed(0)
    for batch, channels, height, width, radius in ((2, 3, 5, 7, 1), (1, 4, 9, 6, 3), (2, 2, 4, 4, 2)):
        padded = torch.randn(batch, channels, height + 2 * radius, width + 2 * radius, dtype=torch.float64)
        kernels = torch.randn(batch, (2 * radius + 1) ** 2, height, width, dtype=torch.float64)
        assert torch.allclose(
            apply_pixel_kernels(padded, kernels), unfold_pixel_kernels(padded, kernels), atol=1e-12
        )


def test_pixel_kernel_gradients_pass_gradcheck_and_equal_the_unfolds():
    """The tap-by-tap backward (`PixelKernels`) is the true gradient, for each input alone and for both."""
    torch.manual_seed(0)
    for radius in (1, 2):
        padded = torch.randn(2, 3, 4 + 2 * radius, 5 + 2 * radius, dtype=torch.float64, requires_grad=True)
        kernels = torch.randn(2, (2 * radius + 1) ** 2, 4, 5, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(apply_pixel_kernels, (padded, kernels))
        weights = torch.randn(2, 3, 4, 5, dtype=torch.float64)
        ours = torch.autograd.grad((apply_pixel_kernels(padded, kernels) * weights).sum(), (padded, kernels))
        reference = torch.autograd.grad(
            (unfold_pixel_kernels(padded, kernels) * weights).sum(), (padded, kernels)
        )
        for got, expected in zip(ours, reference, strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
        only_kernels = torch.autograd.grad(apply_pixel_kernels(padded.detach(), kernels).sum(), kernels)[0]
        torch.testing.assert_close(
            only_kernels,
            torch.autograd.grad(unfold_pixel_kernels(padded.detach(), kernels).sum(), kernels)[0],
        )


def test_pixel_kernel_taps_are_row_major_offsets():
    padded = torch.arange(5 * 6, dtype=torch.float64).reshape(1, 1, 5, 6)
    kernels = torch.zeros(1, 9, 3, 4, dtype=torch.float64)
    kernels[:, 5] = 1  # tap 5 = row offset 1, column offset 2
    assert torch.equal(apply_pixel_kernels(padded, kernels)[0, 0], padded[0, 0, 1:4, 2:6])


def test_upsampled_rows_and_reflection_equal_the_whole_map():
    torch.manual_seed(0)
    source = torch.randn(2, 3, 9, 5, dtype=torch.float64)
    whole = F.interpolate(source, size=(18, 10), mode="bicubic", align_corners=False)
    for first, stop in ((0, 18), (0, 1), (3, 4), (7, 12), (17, 18), (5, 18)):
        assert torch.equal(upsampled_rows(source, first, stop), whole[:, :, first:stop])
    padded = F.pad(whole, [3] * 4, mode="reflect")
    rows, cols = reflected(range(-3, 21), 18, "cpu"), reflected(range(-3, 13), 10, "cpu")
    assert torch.equal(whole[:, :, rows[:, None], cols[None, :]], padded)


@pytest.mark.parametrize("chunk_size", [1, 7, 100, None])
def test_tiled_stack_equals_the_naive_stack_in_float64(chunk_size):
    module = random_jbu().double()
    module.chunk_size = chunk_size
    torch.manual_seed(1)
    features, guide = (
        torch.randn(2, 8, 3, 2, dtype=torch.float64),
        torch.randn(2, 3, 40, 30, dtype=torch.float64),
    )
    out = module(features, guide, (48, 32))
    assert torch.allclose(out, naive_jbu(module, features, guide), atol=1e-12, rtol=0)


def test_chunked_equals_unchunked_and_budget_sets_tiles():
    module = random_jbu()
    torch.manual_seed(2)
    features, guide = torch.randn(1, 8, 2, 3), torch.randn(1, 3, 28, 42)
    whole = module(features, guide, (32, 48))
    for options in ({"chunk_size": 1}, {"chunk_size": 49}, {"chunk_size": 10**6}, {"max_memory_mib": 0.05}):
        for key, value in options.items():
            setattr(module, key, value)
        assert torch.allclose(module(features, guide, (32, 48)), whole, atol=1e-5, rtol=0), options
        module.chunk_size, module.max_memory_mib = None, None
    assert module.tile_rows(module.stages[3], torch.empty(1, 8, 32, 32), 64, 64) == 64
    module.max_memory_mib = 0.05
    assert 1 <= module.tile_rows(module.stages[3], torch.empty(1, 8, 32, 32), 64, 64) < 64


def test_float16_output_written_in_tiles_equals_the_float32_result_cast():
    module = random_jbu()
    torch.manual_seed(3)
    features, guide = torch.randn(1, 8, 4, 4), torch.randn(1, 3, 56, 56)
    module.chunk_size = 700  # 10 rows of the last stage, 21 of the third: not a divisor
    expected = module(features, guide, (64, 64)).half()
    module.output_dtype = "float16"
    native = module(features, guide, (64, 64))
    assert native.dtype == torch.float16 and torch.equal(native, expected)
    module.output_dtype = None
    expected = module(features, guide, (150, 70)).half()
    module.output_dtype = "float16"
    for chunk_size in (None, 1, 7 * 70):  # the resize into float16 in chunks of rows too
        module.chunk_size = chunk_size
        resized = module(features, guide, (150, 70))
        assert resized.dtype == torch.float16 and resized.shape == (1, 8, 150, 70)
        assert torch.allclose(resized.float(), expected.float(), atol=1e-3, rtol=1e-3)  # float16 rounding
        assert (resized != expected).float().mean() < 0.01  # and nearly all values equal


def test_other_output_sizes_are_a_bilinear_resize_of_the_native_output():
    module = random_jbu()
    features, guide = torch.randn(1, 8, 2, 3), torch.randn(1, 3, 28, 42)
    native = module(features, guide, (32, 48))
    expected = F.interpolate(native, size=(20, 100), mode="bilinear", align_corners=False)
    assert torch.allclose(module(features, guide, (20, 100)), expected, atol=1e-6)


def test_working_memory_beyond_the_output_stays_under_the_budget_at_a_large_output():
    """8x8 tokens of 16 channels to the native 128² (1 MiB) and to 1024² (64 MiB) under a 4 MiB budget: beyond
    the output, the last stage holds its input (0.25 MiB) and the pooled guide (0.19 MiB) and tiles within the
    budget (untiled, the last stage's kernel intermediates alone would be ~29 MiB, an unfold of the features
    49 MiB); at 1024² nothing but the native map is held while it is resized into the output."""
    budget = 4.0
    module = random_jbu(channels=16, max_memory_mib=budget)
    features, guide = torch.randn(1, 16, 8, 8), torch.randn(1, 3, 112, 112)
    native_mib = 16 * 128 * 128 * 4 / 2**20
    stage_input_mib, guide_mib = native_mib / 4, 3 * 128 * 128 * 4 / 2**20
    peak_native = peak_memory_mib(lambda: module(features, guide, (128, 128)))
    assert native_mib < peak_native < native_mib + stage_input_mib + guide_mib + budget, peak_native
    output_mib = 16 * 1024 * 1024 * 4 / 2**20
    peak = peak_memory_mib(lambda: module(features, guide, (1024, 1024)))
    assert peak < output_mib + native_mib + 1.0, peak  # (+ < 1 MiB of index tensors and the like)


def test_bad_inputs_are_refused_naming_the_value():
    module = random_jbu()
    with pytest.raises(InputSizeError, match="built for 8 channels"):
        module(torch.randn(1, 5, 2, 2), torch.randn(1, 3, 28, 28), (32, 32))
    with pytest.raises(InputSizeError, match="token grid of at least 2x2, got 1x3"):
        module(torch.randn(1, 8, 1, 3), torch.randn(1, 3, 14, 42), (16, 48))
    with pytest.raises(InputSizeError, match="guide"):
        module(torch.randn(1, 8, 2, 2), None, (32, 32))
    with pytest.raises(ValueError, match="output_dtype 'int8'"):
        FeatUpJBU(channels=8, output_dtype="int8")
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        FeatUpJBU(channels=8, chunk_size=0)


def test_from_official_refuses_other_checkpoints_naming_the_file(tmp_path):
    with pytest.raises(
        CheckpointError, match=r"x\.pth: expected a FeatUp JBU-stack checkpoint.*found keys 'jafar'"
    ):
        from_official({"jafar": {"a.weight": torch.zeros(1)}}, "x.pth")
    with pytest.raises(CheckpointError, match=r"lift\.pth: expected a FeatUp.*missing 'up1.range_temp'"):
        from_official({"image_convs_1.0.weight": torch.zeros(1)}, "lift.pth")
    state = {f"upsampler.{k}": v for k, v in official_like_state(8).items()}
    state["upsampler.up2.fixup_proj.0.weight"] = torch.zeros(49, 50, 1, 1)
    with pytest.raises(CheckpointError, match=r"y\.ckpt: tensor shapes do not fit"):
        from_official({"state_dict": state}, "y.ckpt")
    with pytest.raises(CheckpointError, match="found a list"):
        from_official([1, 2], "z.ckpt")


def official_like_state(channels: int) -> dict[str, torch.Tensor]:
    """A state dict with the official JBUStack's key names and shapes (values of a random module of ours)."""
    from featlift.upsamplers.featup_jbu import official_key_map

    own = FeatUpJBU(channels=channels).state_dict()
    return {old: own[new] for old, new in official_key_map().items()}


def test_from_official_takes_a_bare_state_dict_and_infers_the_shape():
    module = random_jbu(channels=8)
    official = {
        old: module.state_dict()[new]
        for old, new in __import__("featlift.upsamplers.featup_jbu", fromlist=["official_key_map"])
        .official_key_map()
        .items()
    }
    loaded = from_official({**official, "downsampler.w": torch.zeros(16, 16)}, "bare.pth")
    assert loaded.channels == 8 and not loaded.training
    features, guide = torch.randn(1, 8, 2, 2), torch.randn(1, 3, 28, 28)
    assert torch.equal(loaded(features, guide, (32, 32)), module(features, guide, (32, 32)))


def test_the_shipped_lift_file_is_refused_naming_it():
    from pathlib import Path

    import featlift.pretrained

    path = (
        Path(featlift.pretrained.__file__).parent
        / "lift_vit_small_patch14_dinov2_lvd142m"
        / "model.safetensors"
    )
    obj = read_weights_file(path, CheckpointError, what="FeatUp checkpoint")
    with pytest.raises(
        CheckpointError, match=rf"{path.name}: expected a FeatUp JBU-stack.*missing 'up1.range_temp'"
    ):
        from_official(obj, str(path))


@requires_peers
def test_official_jafar_file_is_refused_naming_it():
    path = PEERS / "jafar_vit_small_patch14_dinov2.lvd142m.pth"
    obj = read_weights_file(path, CheckpointError, what="FeatUp checkpoint")
    with pytest.raises(
        CheckpointError, match=rf"{path.name}: expected a FeatUp JBU-stack.*found keys 'jafar'"
    ):
        from_official(obj, str(path))


@requires_peers
def test_equals_the_official_code_on_every_reference_case():
    from safetensors.torch import load_file

    module = from_official(
        read_weights_file(CHECKPOINT, CheckpointError, what="FeatUp checkpoint"), str(CHECKPOINT)
    )
    inputs = load_file(str(REFERENCE / "inputs.safetensors"))
    reference = load_file(str(REFERENCE / "featup_jbu.safetensors"))
    cases = sorted({key.rsplit(".", 1)[0] for key in reference})
    assert cases == ["beagle.out_256x256", "davis_dog_00000.out_256x256"]
    for case in cases:
        image, out = case.split(".")
        height, width = (int(s) for s in out[len("out_") :].split("x"))
        guide = (inputs[f"{image}.image_224_uint8"].float() / 255 - IMAGENET_MEAN) / IMAGENET_STD
        with torch.no_grad():
            ours = module(inputs[f"{image}.features_224"], guide, (height, width))[0]
        yx = reference[f"{case}.yx"].long()
        pixels = reference[f"{case}.pixels"]
        tolerance = RELATIVE_TOLERANCE * float(pixels.abs().max())
        assert (ours[:, yx[:, 0], yx[:, 1]].T - pixels).abs().max() <= tolerance, case
        assert (ours.mean(dim=(1, 2)) - reference[f"{case}.mean"]).abs().max() <= tolerance, case
        assert (ours.std(dim=(1, 2)) - reference[f"{case}.std"]).abs().max() <= tolerance, case
