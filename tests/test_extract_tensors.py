"""`featlift.extract_features`: images already in memory, batched, as `featlift extract` does for files."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from toy_upsamplers import GuideRecorder, checkerboard

from featlift import InputSizeError, extract_features
from featlift.images import image_to_tensor
from featlift.pipeline import FeaturePipeline
from featlift.upsamplers import LiFT


@pytest.fixture
def pipeline(tiny_backbone):
    torch.manual_seed(0)
    backbone = tiny_backbone(patch_size=16)
    return FeaturePipeline(backbone, LiFT(backbone.channels, 16).eval())


def test_batches_give_the_same_features_as_one_call(pipeline):
    images = torch.rand(5, 3, 32, 48)
    expected = pipeline(images)
    got = extract_features(pipeline, images, batch_size=2, progress=True)
    assert got.shape == (5, pipeline.backbone.channels, 4, 6) and got.device.type == "cpu"
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    half = extract_features(pipeline, images, batch_size=3, dtype=torch.float16)
    assert half.dtype == torch.float16


def test_uint8_tensors_and_pil_images_are_read_as_extract_reads_files(pipeline):
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    expected = pipeline(pixels.float() / 255)
    torch.testing.assert_close(extract_features(pipeline, pixels), expected, atol=1e-5, rtol=1e-4)
    pil = [Image.fromarray(p.permute(1, 2, 0).numpy()).resize((40, 24)) for p in pixels]
    got = extract_features(pipeline, pil, size="32x48")
    expected = pipeline(torch.stack([image_to_tensor(p, (32, 48)) for p in pil]))  # extract's own resize
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_a_list_of_differently_sized_tensors_needs_a_size(pipeline):
    images = [torch.rand(3, 32, 32), torch.rand(3, 48, 32)]
    with pytest.raises(InputSizeError, match="image 1 is 48x32, image 0 is 32x32: pass size="):
        extract_features(pipeline, images)
    assert extract_features(pipeline, images, size=32).shape[-2:] == (4, 4)


@pytest.mark.parametrize(
    "images, message",
    [
        (
            torch.rand(3, 32, 32),
            r"images: expected a \[B, 3, H, W\] tensor .* got shape \[3, 32, 32\]; add the batch",
        ),
        (
            [torch.rand(1, 32, 32)],
            r"image 0: expected 3 \(RGB\) channels, .* got shape \[1, 32, 32\]: greyscale",
        ),
        (
            [torch.ones(3, 32, 32, dtype=torch.int64)],
            r"image 0: expected uint8 pixels \(0-255\) or float .* torch.int64",
        ),
        (["photo.jpg"], "image 0: expected a PIL image or a"),
        ([], "no images given"),
        (torch.rand(1, 3, 30, 32), "not a multiple of .* patch size 16"),
    ],
)
def test_bad_inputs_are_named(pipeline, images, message):
    with pytest.raises(InputSizeError, match=message):
        extract_features(pipeline, images)


def test_the_pipeline_refuses_integer_pixels(pipeline):
    with pytest.raises(InputSizeError, match=r"expected float pixels in \[0, 1\], got torch.uint8; divide"):
        pipeline(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def normalised(images: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    return (images - mean[:, None, None]) / std[:, None, None]


def with_nan(images: torch.Tensor) -> torch.Tensor:
    images = images.clone()
    images[0, 1, 2, 3] = float("nan")
    return images


BAD_BATCHES = [
    (
        torch.rand(2, 32, 32, 3),
        r"images: expected 3 \(RGB\) channels.* got shape \[2, 32, 32, 3\]: .*permute\(0, 3, 1, 2\)",
    ),
    (
        torch.rand(2, 1, 32, 32),
        r"got shape \[2, 1, 32, 32\]: greyscale: repeat it to RGB, e.g. .expand\(-1, 3, -1, -1\)",
    ),
    (torch.rand(2, 4, 32, 32), r"got shape \[2, 4, 32, 32\]: RGBA: composite or drop the alpha channel"),
    (torch.rand(0, 3, 32, 32), r"images: no pixels \(shape \[0, 3, 32, 32\]\)"),
    (
        torch.rand(2, 3, 32, 32) * 255,
        r"float pixels in \[0, 1\], got values from .* to 25\d.*: 0-255 pixels\? divide them by 255",
    ),
    (
        normalised(torch.rand(2, 3, 32, 32)),
        r"got values from -2.* normalised pixels\? pass them unnormalised",
    ),
    (
        torch.linspace(0, 1.01, 2 * 3 * 32 * 32).reshape(2, 3, 32, 32),
        r"got values from 0 to 1.01 .*: clamp them with .clamp\(0, 1\)",
    ),
    (with_nan(torch.rand(2, 3, 32, 32)), r"images: 1 of 6144 pixels are NaN or infinite"),
    (torch.ones(2, 3, 32, 32, dtype=torch.int32), r"expected float pixels in \[0, 1\], got torch.int32"),
]


@pytest.mark.parametrize("images, message", BAD_BATCHES)
def test_the_pipeline_names_what_is_wrong_with_its_input(pipeline, images, message):
    with pytest.raises(InputSizeError, match=message):
        pipeline(images)


@pytest.mark.parametrize("images, message", [case for case in BAD_BATCHES if case[0].dtype != torch.int32])
def test_extract_features_names_what_is_wrong_with_a_batch_before_resizing(pipeline, images, message):
    with pytest.raises(InputSizeError, match=message.replace("images: ", r"images(\[0:8\])?: ")):
        extract_features(pipeline, images, size=32)


@pytest.mark.parametrize(
    "image, message",
    [
        (
            torch.rand(32, 32, 3),
            r"image 1: expected 3 \(RGB\) channels.* got shape \[32, 32, 3\]: .*permute\(2, 0, 1\)",
        ),
        (torch.rand(4, 32, 32), r"image 1: .* got shape \[4, 32, 32\]: RGBA"),
        (
            torch.rand(3, 32, 32) * 255,
            r"image 1: expected uint8 pixels \(0-255\) or float pixels in \[0, 1\], .* divide",
        ),
        (with_nan(torch.rand(1, 3, 32, 32))[0], r"image 1: 1 of 3072 pixels are NaN or infinite"),
    ],
)
def test_extract_features_names_what_is_wrong_with_an_image_of_a_list(pipeline, image, message):
    with pytest.raises(InputSizeError, match=message):
        extract_features(pipeline, [torch.rand(3, 40, 40), image], size=32)


def test_the_pipeline_refuses_images_on_another_device(pipeline):
    with pytest.raises(
        InputSizeError, match=r"images are on meta, the pipeline on cpu: move them with .to\('cpu'\)"
    ):
        pipeline(torch.rand(1, 3, 32, 32, device="meta"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_precisions_are_converted(pipeline, dtype):
    images = torch.rand(2, 3, 32, 32).to(dtype)
    expected = pipeline(images.float())
    torch.testing.assert_close(pipeline(images), expected)
    torch.testing.assert_close(extract_features(pipeline, images), expected, atol=1e-5, rtol=1e-4)


def test_a_method_guided_at_the_output_size_gets_the_pixels_before_the_resize(tiny_backbone):
    """The guide is the original image at the output size: a 1-pixel checkerboard survives, which a
    guide made from the 32 px input (resized down, then up) would have blurred to grey."""
    backbone = tiny_backbone(patch_size=16)
    pipeline = FeaturePipeline(backbone, GuideRecorder(), output_size=(64, 64))
    board = checkerboard(64, 64)
    GuideRecorder.seen.clear()
    features = extract_features(pipeline, board.expand(3, -1, -1, -1), size=32, batch_size=2)
    assert features.shape == (3, backbone.channels, 64, 64)
    pil = Image.fromarray((board * 255).byte().permute(1, 2, 0).numpy())
    extract_features(pipeline, [pil], size=32)
    assert [tuple(g.shape) for g in GuideRecorder.seen] == [(2, 3, 64, 64), (1, 3, 64, 64), (1, 3, 64, 64)]
    expected = backbone.normalize(board[None])
    for guide in GuideRecorder.seen:
        torch.testing.assert_close(guide, expected.expand_as(guide))
