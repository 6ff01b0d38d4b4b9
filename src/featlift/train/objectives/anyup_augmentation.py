"""AnyUp's photometric augmentation of the guide image (``anyup/utils/training.py``,
``build_augmentation_transform`` at strength 1), drawn from a given generator.

The original's steps, in order, on the uint8 image (each with its probability; torchvision's own ``p`` of
the Random* transforms multiplies in, e.g. ``RandomApply([RandomAutocontrast()], p=0.2)`` applies with
0.2 x 0.5):

1. p 0.5: colour jitter (brightness and contrast factors in [0.8, 1.2], saturation in [0.7, 1.3], hue
   shift in [-0.05, 0.05], in a random order), then a photometric distortion (each with p 0.5:
   brightness [0.875, 1.125], contrast [0.5, 1.5] before or after saturation [0.5, 1.5] and hue
   [-0.05, 0.05], and a random channel permutation);
2. p 0.1: greyscale;  3. p 0.35: Gaussian blur, kernel 5, sigma in [0.3, 1.5];
4. always: JPEG at quality 95, 80, 60 or 40 (p 0.25, 0.35, 0.25, 0.15);
5. p 0.1 autocontrast, p 0.075 equalize, p 0.1 sharpness x1.5, p 0.05 posterize to 5 bits,
   p 0.025 solarize (threshold 0.9 on the uint8 scale, so every pixel above 0 is inverted), p 0.01 invert;
6. in float: p 0.6: Gaussian noise, sigma 0.03, clipped to [0, 1].

The original augments the 448 px image and then resizes it to the 224 px guide; featlift augments the
guide view itself, so the blur sigma and the noise sigma are scaled by ``scale`` (the guide's size over
the image's, 0.5) to keep their size relative to the image content. JPEG blocks, sharpening and
equalisation act at the guide's resolution instead of twice that.
"""

from __future__ import annotations

import warnings

import torch
import torchvision.transforms.v2.functional as TF

JPEG_QUALITIES = (95, 80, 60, 40)
JPEG_WEIGHTS = (0.25, 0.35, 0.25, 0.15)


def _chance(generator: torch.Generator, p: float) -> bool:
    return bool(torch.rand(1, generator=generator) < p)


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return float(low + (high - low) * torch.rand(1, generator=generator))


def _colour_jitter(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    factors = {
        "brightness": _uniform(generator, 0.8, 1.2),
        "contrast": _uniform(generator, 0.8, 1.2),
        "saturation": _uniform(generator, 0.7, 1.3),
        "hue": _uniform(generator, -0.05, 0.05),
    }
    adjust = {
        "brightness": TF.adjust_brightness,
        "contrast": TF.adjust_contrast,
        "saturation": TF.adjust_saturation,
        "hue": TF.adjust_hue,
    }
    order = list(factors)
    for k in torch.randperm(4, generator=generator).tolist():
        image = adjust[order[k]](image, factors[order[k]])
    return image


def _photometric_distortion(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    ranges = {
        "brightness": (0.875, 1.125),
        "contrast": (0.5, 1.5),
        "saturation": (0.5, 1.5),
        "hue": (-0.05, 0.05),
    }
    factors = {
        name: _uniform(generator, *bounds) if _chance(generator, 0.5) else None
        for name, bounds in ranges.items()
    }
    contrast_first = _chance(generator, 0.5)
    permutation = torch.randperm(3, generator=generator) if _chance(generator, 0.5) else None
    if factors["brightness"] is not None:
        image = TF.adjust_brightness(image, factors["brightness"])
    if factors["contrast"] is not None and contrast_first:
        image = TF.adjust_contrast(image, factors["contrast"])
    if factors["saturation"] is not None:
        image = TF.adjust_saturation(image, factors["saturation"])
    if factors["hue"] is not None:
        image = TF.adjust_hue(image, factors["hue"])
    if factors["contrast"] is not None and not contrast_first:
        image = TF.adjust_contrast(image, factors["contrast"])
    if permutation is not None:
        image = image[permutation]
    return image


def anyup_augment(image: torch.Tensor, generator: torch.Generator, scale: float = 0.5) -> torch.Tensor:
    """uint8 ``[3, H, W]`` -> float ``[3, H, W]`` in [0, 1], augmented as AnyUp's training augments its guide
    (see the module docstring); deterministic in `generator`'s state."""
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a uint8 [3, H, W] image, got {image.dtype} {list(image.shape)}")
    image = image.cpu()
    if _chance(generator, 0.5):
        image = _photometric_distortion(_colour_jitter(image, generator), generator)
    if _chance(generator, 0.1):
        image = TF.rgb_to_grayscale(image, num_output_channels=3)
    if _chance(generator, 0.35):
        sigma = _uniform(generator, 0.3, 1.5) * scale
        image = TF.gaussian_blur(image, kernel_size=[5, 5], sigma=[sigma, sigma])
    pick = int(torch.multinomial(torch.tensor(JPEG_WEIGHTS), 1, generator=generator))
    with warnings.catch_warnings():  # torchvision 0.29 deprecates its JPEG codec in favour of torchcodec
        warnings.simplefilter("ignore", DeprecationWarning)
        image = TF.jpeg(image, JPEG_QUALITIES[pick])
    if _chance(generator, 0.2 * 0.5):
        image = TF.autocontrast(image)
    if _chance(generator, 0.15 * 0.5):
        image = TF.equalize(image)
    if _chance(generator, 0.2 * 0.5):
        image = TF.adjust_sharpness(image, 1.5)
    if _chance(generator, 0.1 * 0.5):
        image = TF.posterize(image, 5)
    if _chance(generator, 0.05 * 0.5):
        image = TF.solarize(image, 0.9)
    if _chance(generator, 0.02 * 0.5):
        image = TF.invert(image)
    out = image.float().div(255.0)
    if _chance(generator, 0.6):
        noise = torch.randn(out.shape, generator=generator) * (0.03 * scale)
        out = (out + noise).clamp_(0.0, 1.0)
    return out
