"""One resize: a file, PIL image or tensor gives the same features; the training pyramid resizes once."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from conftest import IMAGENET_SAMPLE, TINY_TIMM_NAME
from PIL import Image

from featlift import create_backbone, extract_features
from featlift.cli import main
from featlift.extract import load_features
from featlift.images import image_to_tensor, load_image, resize_images
from featlift.pipeline import FeaturePipeline
from featlift.train.data import TrainImage, load_pyramid


def random_png(path, height: int, width: int, seed: int = 0) -> np.ndarray:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels


def test_a_picture_gives_the_same_features_as_a_file_a_pil_image_and_a_tensor(tmp_path, tiny_timm_weights):
    folder = tmp_path / "images"
    folder.mkdir()
    pixels = random_png(folder / "photo.png", 40, 56)
    argv = ["-q", "extract", str(folder), "--out", str(tmp_path / "out"), "--size", "32x48", "--workers", "0"]
    argv += ["--backbone", TINY_TIMM_NAME, "--weights", str(tiny_timm_weights), "--upsampler", "none"]
    assert main(argv) == 0
    from_file, _ = load_features(tmp_path / "out" / "photo.png.safetensors")
    pipeline = FeaturePipeline(create_backbone(TINY_TIMM_NAME, weights=tiny_timm_weights))
    uint8 = torch.from_numpy(pixels).permute(2, 0, 1)
    inputs = {
        "PIL image": [Image.open(folder / "photo.png")],
        "uint8 tensor": [uint8],
        "float batch": uint8[None].float() / 255,
    }
    for name, images in inputs.items():
        features = extract_features(pipeline, images, size=(32, 48))[0]
        torch.testing.assert_close(features, from_file, atol=1e-5, rtol=1e-4, msg=name)


def test_the_training_pyramid_resizes_each_level_once_from_the_original(tmp_path):
    pixels = random_png(tmp_path / "photo.png", 70, 90)
    digest = hashlib.sha256((tmp_path / "photo.png").read_bytes()).hexdigest()
    pyramid = load_pyramid(TrainImage(tmp_path / "photo.png", "photo.png", digest), 64)
    original = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255
    for level, size in zip(pyramid, (64, 32, 16), strict=True):
        expected = (resize_images(original, (size, size))[0] * 255).round().to(torch.uint8)
        assert level.dtype == torch.uint8
        torch.testing.assert_close(level, expected, atol=0, rtol=0)


def test_the_resize_leaves_an_image_of_the_right_size_alone():
    images = torch.rand(2, 3, 32, 48)
    assert resize_images(images, (32, 48)) is images and resize_images(images, None) is images


@pytest.fixture(scope="module")
def real_photos():
    paths = sorted(IMAGENET_SAMPLE.glob("*"))[::175][:4]
    if not paths:
        pytest.skip(f"no images in {IMAGENET_SAMPLE} (../shared is absent)")
    return paths


def test_real_photos_give_the_same_dinov2_features_as_file_pil_image_and_tensor(real_photos, dinov2_backbone):
    pipeline = FeaturePipeline(dinov2_backbone)
    from_files = torch.stack([image_to_tensor(load_image(path), (224, 224)) for path in real_photos])
    expected = pipeline(from_files)  # what `featlift extract` computes for the files
    tensors = [
        torch.from_numpy(np.asarray(Image.open(p).convert("RGB")).copy()).permute(2, 0, 1)
        for p in real_photos
    ]
    for images in ([Image.open(path) for path in real_photos], tensors):
        torch.testing.assert_close(
            extract_features(pipeline, images, size=224), expected, atol=1e-4, rtol=1e-4
        )


def test_the_resize_stays_within_a_rounding_step_of_pils_on_real_photos(real_photos):
    """featlift's resize (torch's antialiased bicubic) is PIL's to within rounding on real photos, on average."""
    for path in real_photos:
        image = load_image(path)
        ours = image_to_tensor(image, (224, 224))
        pil = (
            torch.from_numpy(np.asarray(image.resize((224, 224), Image.BICUBIC)).copy()).permute(2, 0, 1)
            / 255
        )
        assert (ours - pil).abs().mean() * 255 < 0.5, path.name
