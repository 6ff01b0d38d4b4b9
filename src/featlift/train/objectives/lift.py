"""LiFT's training objective, its validation metric, and its fit of ``output_scale``.

For an image resized to ``S`` and its antialiased downsamplings to ``S/2`` and ``S/4`` (views ``s1``, ``s2``,
``s4``), with frozen backbone features ``f1 = f(S)``, ``f2 = f(S/2)``, ``f4 = f(S/4)``:

    loss = L(LiFT(img/2, f2), f1) + L(LiFT(img/4, f4), f2)

where ``L`` is the ``--loss`` distance and LiFT is one pass (`LiFT.upsample_2x`). Validation: the mean
cosine to ``f1`` of LiFT(img/2, f2) and of bilinear(f2) over the held-out images. After every epoch LiFT's
``output_scale`` is fitted by least squares to ``f1`` on a subset of the training images
(`calibration_images`), so the held-out images stay unused for measuring the fitted module.

`checkpoint_batches`, `validate_checkpoint` and `fit_output_scale` do the same outside a training run.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from ...backbones import Backbone
from ...upsamplers import Upsampler
from ..batches import Batch, ImageBatches
from ..cache import FeatureCache
from ..data import TrainImage
from ..distributed import DistInfo
from ..validation import validate, validation_totals
from ..views import View
from .base import EpochEnd, Objective, register_objective
from .losses import cosine_map, feature_loss

CALIBRATION_IMAGES = 64  # training images that output_scale is fitted on after every epoch (at most)
VIEWS = (View("s1", 1.0), View("s2", 0.5), View("s4", 0.25))


def lift_objective(
    upsampler: Upsampler,
    guide2: torch.Tensor,
    guide4: torch.Tensor,
    f1: torch.Tensor,
    f2: torch.Tensor,
    f4: torch.Tensor,
    kind: str = "cosine",
) -> tuple[torch.Tensor, dict[str, float]]:
    """The two-scale objective. Guides are normalised images at ``S/2`` and ``S/4``; returns (loss, parts)."""
    loss_2x = feature_loss(upsampler.upsample_2x(f2, guide2), f1, kind)
    loss_4x = feature_loss(upsampler.upsample_2x(f4, guide4), f2, kind)
    return loss_2x + loss_4x, {
        "loss_half_to_full": float(loss_2x.detach()),
        "loss_quarter_to_half": float(loss_4x.detach()),
    }


@torch.no_grad()
def validation_sums(
    upsampler: Upsampler, guide2: torch.Tensor, f1: torch.Tensor, f2: torch.Tensor
) -> torch.Tensor:
    """Sums over the images of: the mean cosine to ``f1`` of LiFT(img/2, f2) and of bilinear(f2), and
    ``<LiFT, f1>`` and ``<LiFT, LiFT>`` (whose ratio is the least-squares rescaling of LiFT's output):
    tensor ``[4]``."""
    lifted = upsampler.upsample_2x(f2, guide2)
    bilinear = F.interpolate(f2, size=f1.shape[-2:], mode="bilinear", align_corners=False)
    lifted64, target64 = lifted.double(), f1.double()
    return torch.stack(
        [
            cosine_map(lifted, f1).mean(dim=(1, 2)).sum().double(),
            cosine_map(bilinear, f1).mean(dim=(1, 2)).sum().double(),
            (lifted64 * target64).sum(),
            (lifted64 * lifted64).sum(),
        ]
    )


def calibration_images(train_images: list[TrainImage]) -> list[TrainImage]:
    """The training images that ``output_scale`` is fitted on: every k-th, at most `CALIBRATION_IMAGES`.

    Training images, so that the validation images stay held out for measuring the fitted module; a
    subset, so that the fit costs about as much as the validation and not another pass over the data.
    """
    step = max(1, math.ceil(len(train_images) / CALIBRATION_IMAGES))
    return train_images[::step]


def fitted_output_scale(upsampler: Upsampler, sums: dict[str, float]) -> float | None:
    """The scale s minimising |s * LiFT_unscaled(img/2, f(img/2)) - f(img)|^2, from `LiftObjective`'s sums;
    None for an upsampler without ``output_scale`` or without images."""
    if not hasattr(upsampler, "output_scale") or sums.get("square", 0.0) <= 0:
        return None
    return round(upsampler.output_scale * sums["dot"] / sums["square"], 5)  # the current scale cancels out


@register_objective("lift")
class LiftObjective(Objective):
    """LiFT's objective; see the module docstring."""

    views = VIEWS
    sums = ("cosine_lift", "cosine_bilinear", "dot", "square")
    fitted_args = ("output_scale",)
    description = (
        "L(LiFT(img/2, f(img/2)), f(img)) + L(LiFT(img/4, f(img/4)), f(img/2)); img, img/2 and img/4 each resized "
        "once from the original (S x S, S/2, S/4) by torch's antialiased bicubic resize, as extract; frozen "
        "backbone; Adam"
    )

    def loss(self, upsampler: Upsampler, batch: Batch) -> torch.Tensor:
        guide2, guide4 = batch.guide("s2"), batch.guide("s4", stream=1)
        features = batch.features
        loss, _ = lift_objective(
            upsampler, guide2, guide4, features["s1"], features["s2"], features["s4"], self.distance
        )
        return loss

    def validation_sums(self, upsampler: Upsampler, batch: Batch) -> torch.Tensor:
        return validation_sums(upsampler, batch.guide("s2"), batch.features["s1"], batch.features["s2"])

    def validation_metrics(self, sums: dict[str, float], images: int) -> dict[str, Any]:
        return {
            "val_cosine_lift": round(sums["cosine_lift"] / images, 5),
            "val_cosine_bilinear": round(sums["cosine_bilinear"] / images, 5),
        }

    def after_epoch(self, upsampler: Upsampler, end: EpochEnd) -> dict[str, Any]:
        calibration = calibration_images(end.train_images)
        scale = fitted_output_scale(upsampler, end.evaluate(calibration)[0])
        if scale is None:
            return {}
        upsampler.output_scale = scale  # saved with the checkpoint's config
        return {"output_scale": scale, "output_scale_images": len(calibration)}


def checkpoint_batches(
    backbone: Backbone,
    images: list[TrainImage],
    image_size: int,
    cache: FeatureCache | None = None,
    cache_dtype: str = "float16",
    device: str | torch.device = "cpu",
) -> ImageBatches:
    """`images` loaded as `featlift train` loads them for LiFT (views s1, s2, s4; cached backbone features),
    for `validate_checkpoint` and `fit_output_scale` outside a training run."""
    return ImageBatches(backbone, images, VIEWS, image_size, 0, cache, cache_dtype, torch.device(device), 0)


def validate_checkpoint(upsampler: Upsampler, batches: ImageBatches) -> dict[str, float]:
    """`featlift train`'s validation of `upsampler` on `batches` (`checkpoint_batches`): the cosine of LiFT
    and of bilinear to the backbone's 2x features, and the number of images."""
    return validate(LiftObjective(), upsampler.to(batches.device), batches, DistInfo())


def fit_output_scale(upsampler: Upsampler, batches: ImageBatches) -> float | None:
    """`featlift train`'s fit of LiFT's ``output_scale`` on `batches` (`checkpoint_batches`): least squares
    to the backbone's 2x features; None for an upsampler without one or when no image loads."""
    sums, _ = validation_totals(LiftObjective(), upsampler.to(batches.device), batches, DistInfo())
    return fitted_output_scale(upsampler, sums)
