"""A small attention-free guided upsampler for training the JAFAR and AnyUp objectives in tests, and a
`Batch` built by hand from random features."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from featlift.train.batches import Batch
from featlift.upsamplers import Upsampler, register_upsampler
from featlift.upsamplers.base import Capabilities, check_inputs, resize_features

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@register_upsampler("objective-toy")
class GuidedToy(Upsampler):
    """Bilinear upsampling with a learnable per-channel gain and bias, plus a 1x1 convolution of the guide
    resized to the output (zero at the start, so the untrained toy is bilinear)."""

    capabilities = Capabilities(guide="input", fitting="trained")

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.gain = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.guide_mix = nn.Conv2d(3, channels, 1)
        nn.init.zeros_(self.guide_mix.weight)
        nn.init.zeros_(self.guide_mix.bias)

    def config(self):
        return {"channels": self.channels}

    def forward(self, features, guide, output_size):
        size = check_inputs(features, guide, output_size)
        guide = F.interpolate(guide, size=size, mode="bilinear", align_corners=False)
        return resize_features(features, size) * self.gain + self.bias + self.guide_mix(guide)


def normalize(images: torch.Tensor) -> torch.Tensor:
    return (images - IMAGENET_MEAN.to(images.device)) / IMAGENET_STD.to(images.device)


def random_batch(shapes: dict[str, tuple[int, int, int, int]], channels: int, seed: int = 0) -> Batch:
    """A `Batch` with random uint8 pixels ``[B, 3, h, w]`` and random features ``[B, C, gh, gw]`` per view
    (``shapes[view] = (B, h, w, patch)``)."""
    generator = torch.Generator().manual_seed(seed)
    pixels, features = {}, {}
    for name, (count, height, width, patch) in shapes.items():
        pixels[name] = torch.randint(
            0, 256, (count, 3, height, width), generator=generator, dtype=torch.uint8
        )
        grid = (height // patch, width // patch)
        features[name] = torch.randn(count, channels, *grid, generator=generator)
    count = next(iter(shapes.values()))[0]
    return Batch(pixels, features, list(range(count)), normalize, torch.device("cpu"))
