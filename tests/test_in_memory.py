"""`featlift.extract_features`: images already in memory, batched, as `featlift extract` does for files."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from featlift import FeaturePipeline, InputSizeError, LiFT, extract_features, image_to_tensor


@pytest.fixture
def pipeline(tiny_backbone):
    torch.manual_seed(0)
    backbone = tiny_backbone(patch_size=16)
    return FeaturePipeline(backbone, LiFT(backbone.channels, 16).eval(), iters=1)


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
