"""FeatUp's per-image implicit upsampler: the network, any-resolution evaluation, the fit on known answers, the
pipeline's per-image hook, and ``featlift extract --upsampler featup-implicit --steps N`` with resume per image."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_TIMM_NAME, write_images

from featlift.cli import main
from featlift.errors import InputSizeError
from featlift.extract import load_features
from featlift.pipeline import FeaturePipeline
from featlift.upsamplers import Capabilities, Upsampler, create_upsampler
from featlift.upsamplers.featup_implicit import (
    FeatUpImplicit,
    FourierFeatures,
    ImplicitNetwork,
    KernelDownsampler,
    downsample_to_tokens,
    draw_jitters,
    fourier_width,
    total_variation,
    window_size,
)

PATCH, SIZE, CHANNELS = 8, 48, 6
MIX = torch.Generator().manual_seed(0)
COLOR_MIX = torch.randn(CHANNELS, 3, generator=MIX)


def true_field(images: torch.Tensor) -> torch.Tensor:
    """The toy's true high-resolution features: a fixed nonlinear function of each pixel's colour."""
    return torch.tanh(torch.einsum("cd,ndhw->nchw", COLOR_MIX, images))


def toy_backbone(images: torch.Tensor) -> torch.Tensor:
    """The toy backbone: the true field averaged over each patch (what a ViT token summarises)."""
    return F.avg_pool2d(true_field(images), PATCH)


def toy_image() -> torch.Tensor:
    """Overlapping rectangles whose edges do not fall on patch borders."""
    image = torch.full((1, 3, SIZE, SIZE), -1.0)
    image[:, 0, 5:30, 7:21] = 1.5
    image[:, 1, 20:44, 17:40] = 1.0
    image[:, 2, 30:41, 3:13] = 2.0
    return image


@pytest.fixture(autouse=True)
def one_thread():
    """The fits are small: one thread is faster than two on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small(**options) -> FeatUpImplicit:
    settings = {"steps": 3, "views": 4, "jitters_per_step": 2, "proj_dim": 32, **options}
    return FeatUpImplicit(CHANNELS, PATCH, **settings)


def test_fourier_features_are_sines_and_cosines_of_every_frequency_and_input():
    fourier = FourierFeatures(frequencies=4)
    with torch.no_grad():
        fourier.phases.zero_()
        fourier.phases[1, 2, 3] = 0.5  # the cosine phase of frequency 2, input 3 (g)
    inputs = torch.tensor([[0.1, -0.2, 0.3, 0.4, -0.5]])
    out = fourier(inputs)
    assert out.shape == (1, fourier_width(4)) == (1, 43)
    frequencies = torch.exp(torch.linspace(-2, 10, 4))
    for f in range(4):
        for i in range(5):
            value = frequencies[f] * inputs[0, i]
            phase = 0.5 if (f, i) == (2, 3) else 0.0
            assert out[0, f * 5 + i].item() == pytest.approx(math.sin(value), abs=1e-5)
            assert out[0, 20 + f * 5 + i].item() == pytest.approx(math.cos(value + phase), abs=1e-5)
    assert torch.equal(out[0, 40:], inputs[0, 2:])  # the colours themselves


def test_network_shapes_and_the_official_parameter_count():
    network = ImplicitNetwork(128)
    assert fourier_width() == 303
    # phases 2*30*5, LayerNorm(303), Linear(303, 128), LayerNorm(128), 2 x Linear(128, 128)
    assert sum(p.numel() for p in network.parameters()) == 300 + 606 + 38_912 + 256 + 2 * 16_512 == 73_098
    assert network(torch.rand(7, 5)).shape == (7, 128)
    assert ImplicitNetwork(6, hidden=128)(torch.rand(7, 5)).shape == (7, 6)
    assert window_size(14) == 28 and window_size(16) == 32 and window_size(8) == 16


def test_colour_scaling_is_featup_min_max_to_half_range():
    network = ImplicitNetwork(4)
    image = torch.stack([torch.linspace(-2, 2, 16), torch.linspace(0, 1, 16), torch.full((16,), 3.0)])
    image = image.reshape(1, 3, 4, 4)
    network.set_color_scale(image)
    rows, cols = torch.tensor([0, 3, 1]), torch.tensor([0, 3, 2])
    inputs = network.pixel_inputs(image, rows, cols)
    torch.testing.assert_close(inputs[:, 0], (2 * rows.float() + 1) / 4 - 1)  # pixel-centre coordinates
    torch.testing.assert_close(inputs[:, 1], (2 * cols.float() + 1) / 4 - 1)
    torch.testing.assert_close(inputs[0, 2:4], torch.tensor([-0.5, -0.5]))
    torch.testing.assert_close(inputs[1, 2:4], torch.tensor([0.5, 0.5]))
    assert inputs[:, 4].abs().max() == 0.5  # a constant channel: range clamped at 1e-4, value -0.5


def test_total_variation_is_featup_formula():
    x = torch.tensor([[[[0.0, 1.0], [3.0, 3.0]]]])
    assert total_variation(x).item() == pytest.approx((9 + 4 + 1 + 0) / 4)


def test_jitters_are_featup_pad_zoom_crop_flip_views():
    views = draw_jitters(400, torch.Generator().manual_seed(0))
    zooms = torch.tensor([v.scale for v in views])
    assert 0.35 < (zooms == 1).float().mean() < 0.65 and zooms.max() <= 1.8 and zooms.min() >= 1
    assert 0.35 < sum(v.flip for v in views) / 400 < 0.65
    for view in views:
        top, left, height, width = view.crop
        assert height == width == pytest.approx(1 / view.scale)
        assert -view.pad <= top and top + height <= 1 + view.pad and view.pad == pytest.approx(30 / 224)
    assert [v.crop for v in draw_jitters(5, torch.Generator().manual_seed(3))] == [
        v.crop for v in draw_jitters(5, torch.Generator().manual_seed(3))
    ]


def test_downsampling_windows_are_centred_on_their_tokens():
    features = torch.randn(1, 2, 16, 24)
    down = KernelDownsampler(window_size(4))  # 8x8 windows on the map padded by 2, stride 4
    assert down(F.pad(features, [2] * 4, mode="reflect"), (4, 6)).shape == (1, 2, 4, 6)
    torch.testing.assert_close(  # initialised uniform: the mean of each 8x8 window
        downsample_to_tokens(down, features, 4),
        F.avg_pool2d(F.pad(features, [2] * 4, mode="reflect"), 8, stride=4),
    )
    with torch.no_grad():  # a box over the central 4x4 of each window is the mean over each token's patch
        down.weights.zero_()
        down.weights[2:6, 2:4] = -3.0  # |w| / sum |w|: the sign of a weight does not matter
        down.weights[2:6, 4:6] = 3.0
    torch.testing.assert_close(downsample_to_tokens(down, features, 4), F.avg_pool2d(features, 4))


def test_the_attention_downsampler_of_featup_fits_too():
    from featlift.train.objectives.featup_downsampler import AttentionDownsampler

    assert sum(p.numel() for p in AttentionDownsampler(129, window_size(14)).parameters()) == 1_698
    assert sum(p.numel() for p in KernelDownsampler(window_size(14)).parameters()) == 784
    image = toy_image()
    method = small(downsampler="attention", steps=4)
    network = method.fit_image(toy_backbone(image), image, toy_backbone)
    assert len(network.fit_losses) == 4 and all(math.isfinite(v) for v in network.fit_losses)


def test_any_resolution_evaluation_in_chunks_equals_one_chunk():
    image = toy_image()
    tokens = toy_backbone(image)
    method = small()
    network = method.fit_image(tokens, image, toy_backbone)
    for size in [(SIZE, SIZE), (40, 24), (97, 61)]:
        whole = torch.empty(CHANNELS, *size)
        method.chunk_size = None
        method.evaluate_into(network, image, whole)
        method.chunk_size = 37  # chunks that cut rows in the middle
        chunked = torch.empty(CHANNELS, *size)
        method.evaluate_into(network, image, chunked)
        torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)
        assert whole.isfinite().all() and whole.std() > 0
    half = torch.empty(CHANNELS, *size, dtype=torch.float16)  # output_dtype: written into a float16 map
    method.evaluate_into(network, image, half)
    torch.testing.assert_close(half, whole.half(), rtol=1e-3, atol=1e-3)


def test_fitting_reduces_the_multiview_loss():
    image = toy_image()
    method = small(steps=30, views=8, lr=5e-3)
    losses = method.fit_image(toy_backbone(image), image, toy_backbone).fit_losses
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.2


def test_fit_recovers_the_known_high_resolution_features_better_than_bilinear():
    image = toy_image()
    tokens = toy_backbone(image)
    truth = true_field(image)
    method = small(steps=40, views=8, lr=5e-3)
    fitted = method.fit_upsample(tokens, image, (SIZE, SIZE), toy_backbone)
    bilinear = F.interpolate(tokens, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    fitted_error = (fitted - truth).square().mean().item()
    bilinear_error = (bilinear - truth).square().mean().item()
    assert fitted_error < 0.75 * bilinear_error, (fitted_error, bilinear_error)


def test_draws_are_seeded_per_image_so_a_rerun_gives_the_same_output():
    image = toy_image()
    other = toy_image().flip(-1)
    method = small()
    batch = torch.cat([other, image])
    torch.manual_seed(1)  # whatever the caller's random state: the draws are the image's own
    together = method.fit_upsample(toy_backbone(batch), batch, (16, 16), toy_backbone)
    torch.manual_seed(2)
    alone = method.fit_upsample(toy_backbone(image), image, (16, 16), toy_backbone)
    assert torch.equal(together[1], alone[0])  # the same picture, wherever it is in a batch
    assert not torch.equal(together[0], together[1])
    reseeded = small(seed=1).fit_upsample(toy_backbone(image), image, (16, 16), toy_backbone)
    assert not torch.equal(reseeded, alone)


def test_the_fit_leaves_the_global_random_state_alone():
    image = toy_image()
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    small().fit_upsample(toy_backbone(image), image, (8, 8), toy_backbone)
    assert torch.equal(torch.rand(3), expected)


def test_bad_options_and_calls_name_the_value():
    with pytest.raises(ValueError, match="steps must be a whole number >= 1, got 0"):
        small(steps=0)
    with pytest.raises(ValueError, match="views must be a whole number >= 1, got -2"):
        small(views=-2)
    with pytest.raises(ValueError, match="lr must be > 0 and finite, got nan"):
        small(lr=float("nan"))
    with pytest.raises(ValueError, match="downsampler 'box': expected one of attention, simple"):
        small(downsampler="box")
    image = toy_image()
    with pytest.raises(InputSizeError, match="call it through FeaturePipeline"):
        small()(toy_backbone(image), image, (8, 8))
    with pytest.raises(InputSizeError, match="is not the image the backbone saw"):
        small().fit_upsample(toy_backbone(image), image[..., :40, :40], (8, 8), toy_backbone)


def test_the_pipeline_hands_a_per_image_method_the_backbone(tiny_backbone):
    """`FeaturePipeline` calls `fit_upsample` with autograd on and a `features_of` that is the backbone."""
    seen = {}

    class Recorder(Upsampler):
        capabilities = Capabilities(guide="input", fitting="per-image")

        def fit_upsample(self, features, guide, output_size, features_of):
            views = torch.cat([guide, guide.flip(-1)])
            seen["views"] = features_of(views)
            seen["grad"] = torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
            seen["features"], seen["guide"] = features, guide
            return F.interpolate(features, size=output_size, mode="bilinear")

    backbone = tiny_backbone(patch_size=16)
    images = torch.rand(1, 3, 32, 48)
    FeaturePipeline(backbone, Recorder(), output_size=(4, 6))(images)
    with torch.no_grad():
        expected = backbone(backbone.normalize(images))
        flipped = backbone(backbone.normalize(images).flip(-1))
    torch.testing.assert_close(seen["views"], torch.cat([expected, flipped]))
    assert seen["grad"] and not seen["views"].requires_grad and not seen["views"].is_inference()
    torch.testing.assert_close(seen["guide"], backbone.normalize(images))
    pipeline = FeaturePipeline(backbone, Recorder())
    with pytest.raises(InputSizeError, match="expected normalised images"):
        pipeline.features_of(torch.rand(3, 32, 48))
    with pytest.raises(InputSizeError, match="not a multiple"):
        pipeline.features_of(torch.rand(1, 3, 30, 48))


def test_featup_implicit_through_the_pipeline_fits_the_backbone_features(tiny_backbone):
    backbone = tiny_backbone(patch_size=8)
    method = create_upsampler("featup-implicit", channels=backbone.channels, patch_size=8, steps=2, views=3)
    assert method.capabilities.fitting == "per-image" and not method.trainable
    assert method.native_output_size((3, 5)) == (24, 40) and list(method.state_dict()) == []
    images = torch.rand(2, 3, 24, 40)
    out = FeaturePipeline(backbone, method)(images)
    assert out.shape == (2, backbone.channels, 24, 40) and out.isfinite().all()
    assert not out.requires_grad and list(method.state_dict()) == []  # nothing of a fit stays in the module
    again = FeaturePipeline(backbone, method, output_size=(12, 20))(images[1:])
    assert again.shape == (1, backbone.channels, 12, 20)


# ---------------------------------------------------------------- the CLI


def extract(weights, *args):
    return main(
        [
            "extract",
            *args,
            "--backbone",
            TINY_TIMM_NAME,
            "--weights",
            str(weights),
            "--size",
            "32x48",
            "--workers",
            "0",
        ]
    )


FAST = ["--upsampler", "featup-implicit", "--option", "views=3", "--option", "jitters_per_step=1"]
FAST += ["--option", "proj_dim=16"]


@pytest.fixture
def fits(monkeypatch):
    """Counts the per-image fits (one per image fitted)."""
    calls = []
    original = FeatUpImplicit.fit_image

    def counting(self, features, image, features_of):
        calls.append(self.steps)
        return original(self, features, image, features_of)

    monkeypatch.setattr(FeatUpImplicit, "fit_image", counting)
    return calls


def test_extract_fits_each_image_and_resumes_per_image(tmp_path, tiny_timm_weights, fits, capsys):
    images = write_images(tmp_path / "images", count=3)
    out = tmp_path / "out"
    assert extract(tiny_timm_weights, str(tmp_path / "images"), *FAST, "--steps", "2", "--out", str(out)) == 0
    captured = capsys.readouterr()
    assert "3 written" in captured.out and "featup-implicit fit" in captured.err  # the bar over the steps
    assert fits == [2, 2, 2]
    names = sorted(p.name for p in out.glob("*.safetensors"))
    assert names == sorted(f"{p.name}.safetensors" for p in images)
    first, meta = load_features(out / names[0])
    assert first.shape == (192, 32, 48) and first.isfinite().all()
    options = meta["upsampler_options"]
    assert '"steps": 2' in options and '"views": 3' in options and '"lr": 0.002' in options

    fits.clear()  # a rerun: everything done, nothing fitted
    assert extract(tiny_timm_weights, str(tmp_path / "images"), *FAST, "--steps", "2", "--out", str(out)) == 0
    assert "0 written, 3 already done" in capsys.readouterr().out and fits == []

    (out / names[0]).unlink()  # as if the run had been killed before this image's fit ended
    assert extract(tiny_timm_weights, str(tmp_path / "images"), *FAST, "--steps", "2", "--out", str(out)) == 0
    assert "1 written, 2 already done" in capsys.readouterr().out and fits == [2]
    refitted, _ = load_features(out / names[0])
    assert torch.equal(refitted, first)  # the draws are seeded per image: the same output again

    # other settings are not mixed into the folder
    assert extract(tiny_timm_weights, str(tmp_path / "images"), *FAST, "--steps", "3", "--out", str(out)) == 2
    assert "upsampler_options" in capsys.readouterr().err


def test_extract_quiet_shows_no_step_bar(tmp_path, tiny_timm_weights, capsys):
    write_images(tmp_path / "images", count=1)
    argv = [str(tmp_path / "images"), *FAST, "--steps", "1", "--out", str(tmp_path / "out")]
    assert main(["-q", "extract", *argv, "--backbone", TINY_TIMM_NAME, "--weights", str(tiny_timm_weights),
                 "--size", "32x48", "--workers", "0"]) == 0  # fmt: skip
    assert "featup-implicit fit" not in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--upsampler", "bilinear", "--steps", "5"],
            "--steps 5: upsampler 'bilinear' is not fitted per image",
        ),
        (["--upsampler", "none", "--steps", "5"], "--upsampler none takes no options"),
        (
            ["--upsampler", "featup-implicit", "--option", "views=0"],
            "views must be a whole number >= 1, got 0",
        ),
    ],
)
def test_extract_bad_steps_are_refused(tmp_path, tiny_timm_weights, capsys, args, message):
    write_images(tmp_path / "images", count=1)
    assert extract(tiny_timm_weights, str(tmp_path / "images"), *args, "--out", str(tmp_path / "out")) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_extract_steps_zero_is_a_usage_error(tmp_path, tiny_timm_weights, capsys):
    write_images(tmp_path / "images", count=1)
    with pytest.raises(SystemExit) as exit_info:
        extract(tiny_timm_weights, str(tmp_path / "images"), *FAST, "--steps", "0")
    assert exit_info.value.code == 2
    assert "--steps" in capsys.readouterr().err
