"""Photometric jitter of the guide image, drawn from a generator seeded per (seed, epoch, step, image).

Like torchvision's ``ColorJitter(0.2, 0.2, 0.2, 0.2)`` (the original LiFT's setting): brightness,
contrast and saturation factors in [0.8, 1.2], hue shift in [-0.2, 0.2] turns, applied in a random
order. It is applied only to the guide image LiFT sees; the backbone features (inputs and targets)
come from the un-jittered image, so they can be cached.
"""

from __future__ import annotations

import torch
import torchvision.transforms.functional as TF


def jitter_seed(seed: int, epoch: int, step: int, slot: int) -> int:
    return (((seed * 1_000_003 + epoch) * 1_000_033 + step) * 4099 + slot) % (2**63 - 1)


def color_jitter(image: torch.Tensor, seed: int, strength: float = 0.2) -> torch.Tensor:
    """``[3, H, W]`` float image in [0, 1] -> jittered image in [0, 1]; deterministic in `seed`."""
    generator = torch.Generator().manual_seed(seed)
    factors = 1.0 + (torch.rand(3, generator=generator) * 2 - 1) * strength
    hue = float((torch.rand(1, generator=generator) * 2 - 1) * strength)
    order = torch.randperm(4, generator=generator).tolist()
    for op in order:
        if op == 0:
            image = TF.adjust_brightness(image, float(factors[0]))
        elif op == 1:
            image = TF.adjust_contrast(image, float(factors[1]))
        elif op == 2:
            image = TF.adjust_saturation(image, float(factors[2]))
        else:
            image = TF.adjust_hue(image, hue)
    return image.clamp_(0.0, 1.0)
