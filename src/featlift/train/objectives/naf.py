"""NAF's training objective (Chambon et al., CVPR 2026, github.com/valeoai/NAF: ``train.py``,
``utils/training.py`` ``compute_feats``, ``src/loss.py``, ``config/base.yaml``).

What the original computes per step, for a batch of images (shorter side resized to ``S`` = 512, centre crop
``S x S``) and the frozen backbone ``f``: the target ``f(img)`` (32x32 tokens, patch 16); the input
``f(img_half)`` of the image bilinearly halved (``down_factor: fixed``, 0.5, the size rounded to whole patches);
the guide is the image normalised with ImageNet's mean and std and bilinearly resized to
``min(224, 4 x target grid)`` per side (128 px for a 32x32 target); the loss is the plain MSE (torch's
``MSELoss``, the mean over batch, channels and positions; ``normalize=False``) of
``NAF(guide, f(img_half), target grid)`` to ``f(img)``.

featlift's version, per image ``img`` resized to ``S`` (``--image-size``, default 448: 32 tokens at patch 14):

    loss = mean((U(f(img/2), guide, grid of f(img)) - f(img))^2),   guide = bilinear(img, min(224, 4 x grid))

- the views ``full`` (``S``) and ``half`` (``S/2``) are resized once from the original image by featlift's
  antialiased bicubic resize (the original: torchvision bilinear resize of the shorter side + centre crop, then
  ``F.interpolate`` bilinear without antialias for the half image), and their features are cached;
- the guide is the ``full`` view normalised as the backbone normalises its input (ImageNet's mean and std for
  DINOv2, which is what the original always uses), resized by ``F.interpolate(mode="bilinear")`` as the original;
- ``stochastic``: NAF's RoPE scales its coordinates by a random factor while training, drawn from torch's
  generator, which the loop seeds per step so that a resumed run repeats the uninterrupted one;
- training setup that differs: the original trains 25k steps of batch 4 on ImageNet at 512 px with AdamW (its
  hydra optimizer config, not read here) under bf16 autocast; featlift uses the ``featlift train`` loop (Adam,
  ``--lr``, ``--batch-size``, epochs over ``IMAGES``). ``--loss`` does not apply (the loss is the original's).

Validation (held-out images): the MSE and the mean cosine to ``f(img)`` of the upsampler and of bilinear
upsampling of ``f(img/2)``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ...upsamplers import Upsampler
from ..batches import Batch
from ..views import View
from .base import Objective, register_objective
from .losses import cosine_map

FULL_VIEW = "full"
HALF_VIEW = "half"
GUIDE_LIMIT = 224  # the original's largest guide side
GUIDE_PER_TOKEN = 4  # guide pixels per target token (the original's ``v * 4``)


def naf_guide(batch: Batch, grid: tuple[int, int]) -> torch.Tensor:
    """The guide NAF's training passes: the normalised full image resized bilinearly to
    ``min(224, 4 x grid)`` per side."""
    size = [min(GUIDE_LIMIT, GUIDE_PER_TOKEN * g) for g in grid]
    return F.interpolate(batch.guide(FULL_VIEW), size=size, mode="bilinear", align_corners=False)


@register_objective("naf")
class NafObjective(Objective):
    """NAF's objective; see the module docstring."""

    views = (View(FULL_VIEW, 1.0), View(HALF_VIEW, 0.5))
    sums = ("mse_upsampler", "mse_bilinear", "cosine_upsampler", "cosine_bilinear")
    stochastic = True
    own_loss = "MSE"
    description = (
        "NAF: mean((U(f(img/2), bilinear(img, min(224, 4 x grid)), grid of f(img)) - f(img))^2); img and img/2 "
        "resized once from the original by torch's antialiased bicubic; frozen backbone; featlift's Adam loop"
    )

    def loss(self, upsampler: Upsampler, batch: Batch) -> torch.Tensor:
        target = batch.features[FULL_VIEW]
        grid = tuple(target.shape[-2:])
        pred = upsampler(batch.features[HALF_VIEW], naf_guide(batch, grid), grid)
        return F.mse_loss(pred.float(), target.float())

    def validation_sums(self, upsampler: Upsampler, batch: Batch) -> torch.Tensor:
        target = batch.features[FULL_VIEW].float()
        grid = tuple(target.shape[-2:])
        features = batch.features[HALF_VIEW]
        predictions = (
            upsampler(features, naf_guide(batch, grid), grid).float(),
            F.interpolate(features, size=grid, mode="bilinear", align_corners=False).float(),
        )
        mse = [(pred - target).square().mean(dim=(1, 2, 3)).sum() for pred in predictions]
        cosine = [cosine_map(pred, target).mean(dim=(1, 2)).sum() for pred in predictions]
        return torch.stack([*mse, *cosine]).double()

    def validation_metrics(self, sums: dict[str, float], images: int) -> dict[str, Any]:
        return {f"val_{name}": round(total / images, 6) for name, total in sums.items()}
