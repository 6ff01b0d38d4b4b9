"""The interface every upsampler shares: ``forward(features, image, iters=1, output_size=None)``."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputSizeError


def check_features_and_image(features: torch.Tensor, image: torch.Tensor) -> None:
    if features.ndim != 4:
        raise InputSizeError(f"features: expected [B, C, h, w], got {list(features.shape)}")
    if image.ndim != 4 or image.shape[1] != 3:
        raise InputSizeError(f"image: expected [B, 3, H, W], got {list(image.shape)}")
    if image.shape[0] != features.shape[0]:
        raise InputSizeError(f"batch sizes differ: features {features.shape[0]}, image {image.shape[0]}")


class Upsampler(nn.Module):
    """Maps features ``[B, C, h, w]`` and their guide image ``[B, 3, H, W]`` to denser features.

    Subclasses implement `upsample_once` (2x). `forward` applies it ``iters`` times, resizing the guide
    image 2x before each further pass (as the original iterative LiFT does), then resizes the result
    to ``output_size`` if given. ``image`` is the normalised image the backbone saw.

    Shape:
        - features: ``[B, C, h, w]``; image: ``[B, 3, H, W]``
        - output: ``[B, C, h * 2**iters, w * 2**iters]``, or ``[B, C, *output_size]``
    """

    name: ClassVar[str] = ""
    trainable: ClassVar[bool] = False

    def config(self) -> dict[str, Any]:
        """Constructor arguments that rebuild this module (stored in checkpoints)."""
        return {}

    def upsample_once(self, features: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(
        self,
        features: torch.Tensor,
        image: torch.Tensor,
        iters: int = 1,
        output_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        check_features_and_image(features, image)
        if iters < 0:
            raise ValueError(f"iters must be >= 0, got {iters}")
        for step in range(iters):
            guide = (
                image
                if step == 0
                else F.interpolate(image, scale_factor=2**step, mode="bilinear", align_corners=False)
            )
            features = self.upsample_once(features, guide)
        if output_size is not None and tuple(features.shape[-2:]) != tuple(output_size):
            features = F.interpolate(features, size=tuple(output_size), mode="bilinear", align_corners=False)
        return features
