"""AnyUp's training objective (Wimmer et al., ICLR 2026, github.com/wimmerth/anyup: ``train.py``,
``anyup/loss.py``, ``anyup/utils/dataloader/post_collate.py``, ``config/base.yaml``).

What the original computes per step (``crop_size`` 448, ``img_size`` 224, ``num_local_crops`` 4, both
regularisation weights 0.1), for an image ``I`` resized to 448 and the frozen backbone ``f``:

- ``low`` = ``I`` resized to 224: the input features ``f(low)`` (16x16 at patch 14) and the guide;
- ``P = U(low, f(low), 32x32)``: the prediction at the token grid of the 448 image;
- 4 crops of ``I``, 224 px each, at random patch-aligned offsets (independent draws): ``f(crop)``;
- ``L_rec = loss(window of P under each crop, f(crop))``, the crops' 16x16 windows of ``P``;
- ``L_aug = loss(U(aug(low), f(low), 224x224), stopgrad(U(low, f(low), 224x224)))``: consistency of the
  output at the guide's pixel resolution under a photometric augmentation of the *guide only* (the
  features are the clean ``f(low)``; no backbone features of an augmented image are used);
- ``L_down = loss(area_downsample(P, 16x16), f(low))``: the prediction averaged back to the input grid
  must give the input;
- ``loss = L_rec + 0.1 L_aug + 0.1 L_down``, each ``loss`` being JAFAR's cosine + target-normalised MSE
  (`reconstruction.reconstruction_loss`; AnyUp's ``loss.py`` is JAFAR's unchanged).

featlift's version, with ``S`` = ``--image-size`` (default 448) in place of 448:

- views ``low`` (``S/2``) and nine cached crops ``crop_ij`` of ``S/2`` px of the ``S`` image at offsets
  ``(i, j) x S/4`` for ``i, j`` in 0, 1, 2 (token offsets 0, 8, 16 at 448); each image draws 4 of the 9
  with replacement, per epoch (`DrawnObjective`). The original draws each crop's offsets from the 17 x 17
  patch-aligned positions. ``S`` must be a multiple of 4 patches, so that the crops start on whole tokens.
- ``aug`` is `anyup_augmentation.anyup_augment` of the ``low`` view, drawn per image and epoch: the
  original's augmentation list, applied to the guide itself with blur and noise scaled to it (the original
  augments the 448 image and resizes it); see that module.
- Views are resized once from the original image by featlift's antialiased bicubic resize (the original:
  torchvision bilinear resize of the shorter side to 448 + centre crop, then an antialiased resize to 224).
- Training setup that differs: the original trains on ImageNet (100k steps, hydra's AdamW config, bf16
  autocast, several backbones for the multi-backbone model); featlift uses the ``featlift train`` loop
  (one backbone, Adam, ``--lr``, ``--batch-size``, epochs over ``IMAGES``). ``--loss`` does not apply.

Validation (held-out images): ``P`` against the four quadrant crops' features tiled into the ``S`` grid:
the mean cosine and the loss, of the upsampler and of bilinear upsampling of ``f(low)``, and ``L_down``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ...errors import FeatliftError
from ...upsamplers import Upsampler
from ..batches import Batch
from ..views import View
from .anyup_augmentation import anyup_augment
from .base import register_objective
from .reconstruction import DrawnObjective, reconstruction_loss, reconstruction_terms

LOW_VIEW = "low"
CROP_STEPS = 3  # crop offsets 0, S/4, S/2 in each direction
CROPS_PER_IMAGE = 4  # num_local_crops
AUGMENTATION_WEIGHT = 0.1  # augmentation_regularization
DOWNSAMPLING_WEIGHT = 0.1  # downsampling_regularization
GUIDE_SCALE = 0.5  # the guide's size over the image's (img_size / crop_size)
CROPS = tuple((i, j) for i in range(CROP_STEPS) for j in range(CROP_STEPS))
QUADRANTS = ((0, 0), (0, 2), (2, 0), (2, 2))


def crop_view_name(i: int, j: int) -> str:
    return f"crop_{i}{j}"


VIEWS = (
    View(LOW_VIEW, GUIDE_SCALE),
    *(View(crop_view_name(i, j), 1.0, crop=(i / 4, j / 4, 0.5, 0.5)) for i, j in CROPS),
)


def crop_window(prediction: torch.Tensor, i: int, j: int) -> torch.Tensor:
    """The part of a prediction on the ``S`` image's token grid ``[..., H, W]`` under crop ``(i, j)``."""
    height, width = prediction.shape[-2:]
    if height % 4 or width % 4:
        raise FeatliftError(
            f"objective anyup: the prediction's grid {height}x{width} tokens is not a multiple of 4, so its "
            "crops (offsets of a quarter of the image) do not start on whole tokens; use an --image-size "
            "that is a multiple of 4 patches (e.g. 448 for patch 14)"
        )
    top, left = i * height // 4, j * width // 4
    return prediction[..., top : top + height // 2, left : left + width // 2]


def tiled_quadrants(batch: Batch) -> torch.Tensor:
    """The features of the four quadrant crops, tiled into one map on the ``S`` image's token grid."""
    rows = [torch.cat([batch.features[crop_view_name(i, j)] for j in (0, 2)], dim=-1) for i in (0, 2)]
    return torch.cat(rows, dim=-2)


def downsampling_loss(prediction: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """AnyUp's downsampling consistency: the prediction area-averaged to the input's grid vs the input."""
    return reconstruction_loss(F.interpolate(prediction, size=features.shape[-2:], mode="area"), features)


@register_objective("anyup")
class AnyUpObjective(DrawnObjective):
    """AnyUp's objective; see the module docstring."""

    views = VIEWS
    sums = (
        "cosine_upsampler",
        "loss_upsampler",
        "cosine_bilinear",
        "loss_bilinear",
        "downsampling_loss",
    )
    description = (
        "AnyUp: L(windows of U(img/2, f(img/2), grid of img), f(crops)) + 0.1 L(U(aug(img/2), f(img/2), "
        "S/2 px), stopgrad U(img/2, f(img/2), S/2 px)) + 0.1 L(area(U(...)), f(img/2)); L = cosine + "
        "target-normalised MSE; 4 of 9 cached S/2 crops of the S image and AnyUp's photometric "
        "augmentation of the guide drawn per image and epoch; views resized once from the original by "
        "torch's antialiased bicubic; frozen backbone; featlift's Adam loop"
    )

    def drawn_crops(self, upsampler: Upsampler, batch: Batch) -> list[list[tuple[int, int]]]:
        """This epoch's `CROPS_PER_IMAGE` crops (with replacement) of every image of the batch."""
        return [
            [CROPS[k] for k in torch.randint(len(CROPS), (CROPS_PER_IMAGE,), generator=g).tolist()]
            for g in self.draw_generators(batch, batch.pixels[LOW_VIEW], "anyup-crops")
        ]

    def augmented_guide(self, upsampler: Upsampler, batch: Batch) -> torch.Tensor:
        """This epoch's AnyUp augmentation of every image's guide, normalised as the backbone's input."""
        pixels = batch.pixels[LOW_VIEW]
        generators = self.draw_generators(batch, pixels, "anyup-augmentation")
        images = torch.stack(
            [anyup_augment(image, g, GUIDE_SCALE) for image, g in zip(pixels, generators, strict=True)]
        )
        return batch.normalize(images.to(batch.device))

    def loss_terms(self, upsampler: Upsampler, batch: Batch) -> dict[str, torch.Tensor]:
        """The three terms, unweighted: ``reconstruction``, ``augmentation``, ``downsampling``."""
        features, guide = batch.features[LOW_VIEW], batch.guide(LOW_VIEW)
        grid = (2 * features.shape[-2], 2 * features.shape[-1])
        prediction = upsampler(features, guide, grid)
        windows, targets = [], []
        for k, crops in enumerate(self.drawn_crops(upsampler, batch)):
            for i, j in crops:
                windows.append(crop_window(prediction[k], i, j))
                targets.append(batch.features[crop_view_name(i, j)][k])
        reconstruction = reconstruction_loss(torch.stack(windows), torch.stack(targets))
        pixel_size = tuple(guide.shape[-2:])
        augmented = upsampler(features, self.augmented_guide(upsampler, batch), pixel_size)
        with torch.no_grad():
            clean = upsampler(features, guide, pixel_size)
        return {
            "reconstruction": reconstruction,
            "augmentation": reconstruction_loss(augmented, clean.detach()),
            "downsampling": downsampling_loss(prediction, features),
        }

    def loss(self, upsampler: Upsampler, batch: Batch) -> torch.Tensor:
        terms = self.loss_terms(upsampler, batch)
        return (
            terms["reconstruction"]
            + AUGMENTATION_WEIGHT * terms["augmentation"]
            + DOWNSAMPLING_WEIGHT * terms["downsampling"]
        )

    def validation_sums(self, upsampler: Upsampler, batch: Batch) -> torch.Tensor:
        features, guide = batch.features[LOW_VIEW], batch.guide(LOW_VIEW)
        target = tiled_quadrants(batch)
        size = tuple(target.shape[-2:])
        prediction = upsampler(features, guide, size)
        bilinear = F.interpolate(features, size=size, mode="bilinear", align_corners=False)
        sums = []
        for pred in (prediction, bilinear):
            cosine_term, mse_term = reconstruction_terms(pred, target)
            sums += [(1.0 - cosine_term).sum(), (cosine_term + mse_term).sum()]
        pooled = F.interpolate(prediction, size=features.shape[-2:], mode="area")
        sums.append(sum(reconstruction_terms(pooled, features)).sum())
        return torch.stack(sums).double()

    def validation_metrics(self, sums: dict[str, float], images: int) -> dict[str, Any]:
        return {f"val_{name}": round(total / images, 5) for name, total in sums.items()}
