"""The pipeline's side of the upsampler contract: the guide each method asks for, output sizes, per-image
fitting, and variant specs that take any registered method with its options."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from featlift import FeatliftError, InputSizeError
from featlift.images import resize_images
from featlift.pipeline import FeaturePipeline, build_pipeline
from featlift.upsamplers import Upsampler, register_upsampler, registry
from featlift.upsamplers.base import Capabilities
from featlift.variants import parse_variant, split_spec


def recorder(guide: str, fitting: str = "none"):
    """An upsampler class (not registered) that records the guide it is given and returns bilinear features."""

    class Recorder(Upsampler):
        capabilities = Capabilities(guide=guide, fitting=fitting)
        seen: list = []

        def forward(self, features, guide, output_size):
            type(self).seen.append(None if guide is None else guide.clone())
            return F.interpolate(features, size=output_size, mode="bilinear", align_corners=False)

    return Recorder


def test_each_method_gets_the_guide_it_asks_for(tiny_backbone):
    backbone = tiny_backbone(patch_size=16)
    images = torch.rand(2, 3, 32, 48)
    for kind, expected in [
        ("none", None),
        ("input", backbone.normalize(images)),
        ("output", backbone.normalize(resize_images(images, (8, 12)))),
        ("source", backbone.normalize(images)),  # no sources given: the input images
    ]:
        cls = recorder(kind)
        out = FeaturePipeline(backbone, cls(), output_size=(8, 12))(images)
        assert out.shape == (2, backbone.channels, 8, 12)
        if expected is None:
            assert cls.seen == [None]
        else:
            torch.testing.assert_close(cls.seen[0], expected)


def test_sources_give_high_resolution_guides_from_the_original_pixels(tiny_backbone):
    backbone = tiny_backbone(patch_size=16)
    sources = torch.rand(2, 3, 128, 192)  # a fine random pattern that 32x48 cannot hold
    images = resize_images(sources, (32, 48))
    output = recorder("output")
    FeaturePipeline(backbone, output(), output_size=(64, 96))(images, sources)
    torch.testing.assert_close(output.seen[0], backbone.normalize(resize_images(sources, (64, 96))))
    from_input = backbone.normalize(resize_images(images, (64, 96)))
    assert (output.seen[0] - from_input).abs().mean() > 0.1  # the original's detail, not an enlargement

    source = recorder("source")
    listed = [torch.rand(3, 64, 64), torch.rand(3, 96, 80)]  # two sizes: both resized to the largest
    FeaturePipeline(backbone, source())(images, listed)
    assert source.seen[0].shape == (2, 3, 96, 80)
    torch.testing.assert_close(source.seen[0][1], backbone.normalize(listed[1][None])[0])
    with pytest.raises(InputSizeError, match="sources: 1 images for a batch of 2"):
        FeaturePipeline(backbone, source())(images, listed[:1])
    with pytest.raises(InputSizeError, match=r"sources\[0\]: .*float pixels in \[0, 1\]"):
        FeaturePipeline(backbone, source())(images, [listed[0] * 300, listed[1]])


def test_output_grid_is_the_requested_size_or_the_methods_native_one(tiny_backbone):
    backbone = tiny_backbone(patch_size=16)
    lift = build_pipeline(backbone, upsampler="bilinear", iters=2)
    assert lift.output_grid(32, 48) == (8, 12) and lift(torch.rand(1, 3, 32, 48)).shape[-2:] == (8, 12)
    assert FeaturePipeline(backbone).output_grid(32, 48) == (2, 3)
    assert FeaturePipeline(backbone, output_size=(5, 7))(torch.rand(1, 3, 32, 48)).shape[-2:] == (5, 7)
    with pytest.raises(ValueError, match="output_size must be"):
        FeaturePipeline(backbone, output_size=(0, 4))


def test_a_method_optimised_per_image_runs_with_autograd_inside_the_pipeline(tiny_backbone):
    """A per-image method fits its own parameters at test time: the pipeline must leave inference mode."""

    class FitScale(Upsampler):
        capabilities = Capabilities(guide="none", fitting="per-image")

        def forward(self, features, guide, output_size):
            target = features.detach()
            scale = torch.zeros(1, requires_grad=True)
            optimizer = torch.optim.SGD([scale], lr=0.5)
            for _ in range(50):
                loss = ((features * scale - 2 * target) ** 2).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            return F.interpolate(features * scale.detach(), size=output_size, mode="bilinear")

    backbone = tiny_backbone(patch_size=16)
    images = torch.rand(1, 3, 32, 32)
    out = FeaturePipeline(backbone, FitScale(), output_size=(2, 2))(images)
    torch.testing.assert_close(out, 2 * FeaturePipeline(backbone)(images), rtol=1e-3, atol=1e-3)
    assert not out.requires_grad and not out.is_inference()


@pytest.fixture
def toy_registered():
    @register_upsampler("toy-contract")
    class Toy(Upsampler):
        capabilities = Capabilities(guide="none", output_sizes="fixed", factor=4, fitting="none")
        options = ("gain", "mode", "flip", "size_hint")

        def __init__(
            self,
            channels: int,
            gain: float = 1.0,
            mode: str = "bilinear",
            flip: bool = False,
            size_hint: tuple[int, int] | None = None,
        ):
            super().__init__()
            self.channels, self.gain, self.mode, self.flip, self.size_hint = (
                channels,
                gain,
                mode,
                flip,
                size_hint,
            )

        def forward(self, features, guide, output_size):
            out = self.gain * F.interpolate(features, size=output_size, mode=self.mode)
            return out.flip(-1) if self.flip else out

    yield Toy
    registry.UPSAMPLERS.unregister("toy-contract")


def test_variant_specs_take_any_method_and_its_typed_options(tiny_backbone, toy_registered):
    backbone = tiny_backbone(patch_size=16)
    variant = parse_variant("toy-contract:gain=0.5:mode=nearest:flip=true:size_hint=3x4", backbone)
    toy = variant.pipeline.upsampler
    assert (toy.channels, toy.gain, toy.mode, toy.flip, toy.size_hint) == (
        backbone.channels,
        0.5,
        "nearest",
        True,
        (3, 4),
    )
    assert variant.output_grid((32, 48)) == (8, 12)  # its fixed factor 4
    sized = parse_variant("toy-contract:size=5x6", backbone)
    assert sized.output_grid((32, 48)) == (5, 6) and sized(torch.rand(1, 3, 32, 48)).shape[-2:] == (5, 6)
    assert parse_variant("none:size=4", backbone).output_grid((32, 48)) == (4, 4)
    lift = parse_variant("bilinear:iters=3", backbone)
    assert lift.output_grid((32, 48)) == (16, 24)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("toy-contract:gain=loud", r"gain='loud' is not a valid float"),
        ("toy-contract:flip=maybe", r"flip='maybe' is not a valid bool"),
        (
            "toy-contract:depth=3",
            r"toy-contract has no option 'depth'; its options: size, gain, mode, flip, size_hint",
        ),
        ("toy-contract:ckpt", r"has no trained weights, so --checkpoint does not apply"),
        ("toy-contract:gain=1:gain=2", r"option gain is given twice"),
        ("toy-contract:size=big", r"size 'big': expected S or HxW"),
        ("nope:iters=2", r"unknown upsampler 'nope'"),
        ("input-2x:iters=2", r"input-2x takes no checkpoint or options other than size"),
        ("bilinear:iters=0", r"bilinear iters must be >= 1"),
    ],
)
def test_bad_variant_specs_are_named(tiny_backbone, toy_registered, spec, message):
    with pytest.raises(FeatliftError, match=message):
        parse_variant(spec, tiny_backbone(patch_size=16))


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("lift", ("lift", None, {})),
        ("lift:runs/a:iters=2", ("lift", "runs/a", {"iters": "2"})),
        ("lift:hf-hub:org/name:iters=2", ("lift", "hf-hub:org/name", {"iters": "2"})),
        ("jafar:hf-hub:org/name@v1", ("jafar", "hf-hub:org/name@v1", {})),
        ("lift:size=64x64", ("lift", None, {"size": "64x64"})),
    ],
)
def test_variant_specs_split_into_name_checkpoint_and_options(spec, expected):
    assert split_spec(spec) == expected
