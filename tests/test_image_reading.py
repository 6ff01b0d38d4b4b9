"""Files of every mode Pillow opens, and EXIF-rotated photos, read as the upright 8-bit picture they show."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import IMAGENET_SAMPLE, TINY_TIMM_NAME
from PIL import Image

from featlift.cli import main
from featlift.errors import ImageReadError
from featlift.extract import load_features
from featlift.images import image_to_tensor, load_image
from featlift.pipeline import FeaturePipeline
from featlift.train.data import load_pyramid, scan_images

HEIGHT, WIDTH = 32, 48
ORIENTATION = 0x0112


def picture(channels: int = 1, seed: int = 0) -> np.ndarray:
    """An 8-bit picture ``[H, W]`` (or ``[H, W, channels]``) using the full 0-255 range."""
    rng = np.random.default_rng(seed)
    shape = (HEIGHT, WIDTH) if channels == 1 else (HEIGHT, WIDTH, channels)
    pixels = rng.integers(0, 256, size=shape, dtype=np.uint8)
    pixels.flat[:2] = (0, 255)
    return pixels


def as_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=-1)


def with_transparency(rgb: np.ndarray, transparent: np.ndarray) -> np.ndarray:
    """What a viewer shows over a white page: `rgb`, white where `transparent`."""
    shown = rgb.copy()
    shown[transparent] = 255
    return shown


def left_half(shape=(HEIGHT, WIDTH)) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[:, : WIDTH // 2] = True
    return mask


GREY_ENCODINGS = {  # mode: the file and how it stores the 8-bit grey picture
    "I;16 PNG": ("grey16.png", lambda grey: grey.astype(np.uint16) * 257),
    "I;16 TIFF": ("grey16.tif", lambda grey: grey.astype(np.uint16) * 257),
    "I TIFF": ("grey32.tif", lambda grey: grey.astype(np.int32) * 257),
    "I 16-bit PGM": ("grey16.pgm", lambda grey: grey.astype(np.uint16) * 257),
    "F TIFF 0-1": ("float.tif", lambda grey: grey.astype(np.float32) / 255),
    "F TIFF 0-255": ("float255.tif", lambda grey: grey.astype(np.float32)),
}


def write_mode(folder: Path, mode: str) -> tuple[Path, np.ndarray]:
    """A file holding the picture in Pillow mode `mode`, and the 8-bit RGB picture it shows."""
    grey, rgb = picture(), picture(3)
    save_options = {}
    if mode in GREY_ENCODINGS:
        name, encode = GREY_ENCODINGS[mode]
        path, image, expected = folder / name, Image.fromarray(encode(grey)), as_rgb(grey)
    elif mode == "LA PNG":
        alpha = np.where(left_half(), 0, 255).astype(np.uint8)
        image = Image.fromarray(np.stack([grey, alpha], axis=-1), "LA")
        path, expected = folder / "grey_alpha.png", with_transparency(as_rgb(grey), left_half())
    elif mode == "RGBA PNG":
        alpha = np.where(left_half(), 0, 255).astype(np.uint8)
        image = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
        path, expected = folder / "rgba.png", with_transparency(rgb, left_half())
    elif mode in ("P PNG with transparency", "P GIF with transparency"):
        indices = (grey // 16).astype(np.uint8)  # 16 palette entries, entry 0 transparent
        palette = np.stack([np.arange(16) * 16, 255 - np.arange(16) * 16, np.full(16, 80)], axis=-1)
        image = Image.fromarray(indices, "P")
        image.putpalette(palette.astype(np.uint8).ravel().tolist())
        save_options = {"transparency": 0}
        path = folder / ("palette.png" if "PNG" in mode else "palette.gif")
        expected = with_transparency(palette.astype(np.uint8)[indices], indices == 0)
    elif mode == "CMYK TIFF":
        path, image, expected = folder / "cmyk.tif", Image.fromarray(rgb).convert("CMYK"), rgb
    else:
        raise AssertionError(mode)
    image.save(path, **save_options)
    return path, expected


MODES = [
    *GREY_ENCODINGS,
    "LA PNG",
    "RGBA PNG",
    "P PNG with transparency",
    "P GIF with transparency",
    "CMYK TIFF",
]


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_reads_as_the_8bit_picture_it_shows(tmp_path, mode):
    path, expected = write_mode(tmp_path, mode)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (WIDTH, HEIGHT)
    np.testing.assert_array_equal(np.asarray(image), expected)


def test_partial_alpha_is_composited_over_white(tmp_path):
    rgb = picture(3)
    Image.fromarray(np.dstack([rgb, np.full((HEIGHT, WIDTH), 64, np.uint8)]), "RGBA").save(tmp_path / "a.png")
    shown = rgb * (64 / 255) + 255 * (1 - 64 / 255)
    assert np.abs(np.asarray(load_image(tmp_path / "a.png")) - shown).max() <= 1


def test_a_float_image_with_nan_is_an_error_naming_the_file(tmp_path):
    pixels = picture().astype(np.float32) / 255
    pixels[3, 4] = np.nan
    Image.fromarray(pixels).save(tmp_path / "nan.tif")
    with pytest.raises(ImageReadError, match=r"nan.tif: float image has NaN or infinite pixels"):
        load_image(tmp_path / "nan.tif")


def save_sideways(path: Path, upright: np.ndarray, orientation: int) -> None:
    """Store `upright` as a camera does: pixels in sensor order, EXIF orientation saying how to turn them."""
    undo = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    Image.fromarray(upright).transpose(undo[orientation]).save(path, exif=exif)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied(tmp_path, orientation):
    upright = picture(3)
    save_sideways(tmp_path / "phone.png", upright, orientation)
    with Image.open(tmp_path / "phone.png") as stored:
        assert stored.getexif()[ORIENTATION] == orientation
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "phone.png")), upright)


def extract_folder(folder: Path, out: Path, weights: Path) -> int:
    return main(
        [
            "-q",
            "extract",
            str(folder),
            "--out",
            str(out),
            "--backbone",
            TINY_TIMM_NAME,
            "--weights",
            str(weights),
            "--upsampler",
            "none",
            "--size",
            f"{HEIGHT}x{WIDTH}",
            "--workers",
            "0",
        ]
    )


def test_extract_gives_16bit_float_and_rotated_files_the_features_of_the_8bit_picture(
    tmp_path, tiny_timm_weights
):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(picture()).save(folder / "reference.png")
    for mode in ("I;16 PNG", "F TIFF 0-1"):
        write_mode(folder, mode)
    save_sideways(folder / "phone.png", as_rgb(picture()), 6)
    out = tmp_path / "out"
    assert extract_folder(folder, out, tiny_timm_weights) == 0
    reference, _ = load_features(out / "reference.png.safetensors")
    for name in ("grey16.png", "float.tif", "phone.png"):
        features, _ = load_features(out / f"{name}.safetensors")
        torch.testing.assert_close(features, reference, msg=name)


def test_training_reads_images_as_extract_does(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(picture()).save(folder / "reference.png")
    write_mode(folder, "I;16 PNG")
    save_sideways(folder / "phone.png", as_rgb(picture()), 8)
    scan = scan_images(folder)
    assert [image.relative for image in scan.images] == ["grey16.png", "phone.png", "reference.png"]
    pyramids = [load_pyramid(image, 32) for image in scan.images]
    for pyramid in pyramids[:2]:
        for level, expected in zip(pyramid, pyramids[2], strict=True):
            torch.testing.assert_close(level, expected)


def test_a_real_16bit_scan_gives_the_dinov2_features_of_its_8bit_version(tmp_path, dinov2_backbone):
    """A real photo as 8-bit and as 16-bit greyscale PNG: the same DINOv2 features (not before the fix)."""
    photo = sorted(IMAGENET_SAMPLE.glob("*"))[0]
    grey = np.asarray(Image.open(photo).convert("L"))
    Image.fromarray(grey).save(tmp_path / "grey8.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "grey16.png")
    pipeline = FeaturePipeline(dinov2_backbone)
    eight, sixteen = (
        pipeline(image_to_tensor(load_image(tmp_path / name), (224, 224))[None])
        for name in ("grey8.png", "grey16.png")
    )
    torch.testing.assert_close(sixteen, eight)
