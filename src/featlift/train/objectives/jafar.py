"""JAFAR's training objective (Couairon et al., NeurIPS 2025, github.com/PaulCouairon/JAFAR ``train.py``).

What the original computes per step, for a batch of images resized to ``S x S`` (448) and the frozen
backbone ``f``: the target ``f(img)`` (32x32 tokens at 448, patch 14); the input ``f(img_low)`` of the
image downscaled by a factor ``u ~ U[0.25, 0.5]`` drawn once per batch (the size rounded to a whole number
of patches: 8..16 tokens at 448); the guide is the image bilinearly halved (224 px, whatever ``u``); the
prediction ``JAFAR(guide, f(img_low), size of f(img))`` is compared with `reconstruction_loss` (cosine +
target-normalised MSE, weight 1:1; see `reconstruction`).

featlift's version, per image ``img`` resized to ``S`` (``--image-size``, default 448):

    loss = reconstruction_loss(U(f(img_u), guide, grid of f(img)), f(img)),   guide = bilinear_half(img)

- ``img_u`` is one of the fixed cached views ``img`` x {0.25, 0.3125, 0.375, 0.4375, 0.5} (8, 10, 12, 14,
  16 tokens at 448 with patch 14), drawn uniformly **per image** each epoch (`DrawnObjective`), so the
  cached features are exact. The original draws ``u`` per batch, continuously, so it also sees the odd
  grids 9..15 (and 8 and 16 at half the rate of the others); featlift groups a batch's images by their
  view and calls the upsampler once per group. ``--image-size`` must be a multiple of 16 patches.
- The guide is the normalised full view halved by ``F.interpolate(scale_factor=0.5, mode="bilinear")``,
  as the original does; the views are resized from the original image by featlift's antialiased
  bicubic resize (the original: torchvision bilinear resize of the shorter side + centre crop for
  ``img``, and ``F.interpolate`` bilinear without antialias for ``img_low``).
- Training setup that differs: the original trains on ImageNet at 448 px, 100k steps, AdamW (its hydra
  optimizer config, not read here), bf16 autocast; featlift uses the ``featlift train`` loop (Adam,
  ``--lr``, ``--batch-size``, epochs over ``IMAGES``). ``--loss`` does not apply (the loss is the
  original's). Which ``train.py`` is upstream's could not be checked (the search index holds a public
  copy, deepanaishtaweera/JAFAR, not PaulCouairon/JAFAR's own file): its version at 47dfd7d adds 0.1 x
  the same loss between the outputs at 224 px for a blurred/noised guide and for the clean one; its
  version at d31bcb0 trains on the reconstruction alone, as here. AnyUp kept that consistency term (with
  its own augmentation): see `objectives.anyup`.

Validation (held-out images): at the fixed factors 0.5 (2x) and 0.25 (4x), the mean cosine to ``f(img)``
and the loss, of the upsampler and of bilinear upsampling of the same input.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ...upsamplers import Upsampler
from ..batches import Batch
from ..views import View
from .base import register_objective
from .reconstruction import DrawnObjective, reconstruction_loss, reconstruction_terms

DOWNSCALE_FACTORS = (0.25, 0.3125, 0.375, 0.4375, 0.5)
FULL_VIEW = "full"
VALIDATION_FACTORS = {"2x": 0.5, "4x": 0.25}


def downscaled_view_name(factor: float) -> str:
    return f"down{round(factor * 10000):04d}"  # 0.3125 -> down3125


VIEWS = (View(FULL_VIEW, 1.0), *(View(downscaled_view_name(u), u) for u in DOWNSCALE_FACTORS))


def jafar_guide(batch: Batch) -> torch.Tensor:
    """The guide JAFAR's training passes: the normalised full image bilinearly halved (224 px at 448)."""
    return F.interpolate(batch.guide(FULL_VIEW), scale_factor=0.5, mode="bilinear", align_corners=False)


def upsample_views(
    upsampler: Upsampler,
    batch: Batch,
    view_of_image: list[str],
    guide: torch.Tensor,
    output_size: tuple[int, int],
) -> torch.Tensor:
    """``U(f(view_k), guide_k, output_size)`` for every image k, one upsampler call per distinct view."""
    outputs: list[torch.Tensor | None] = [None] * len(view_of_image)
    for view in dict.fromkeys(view_of_image):
        images = [k for k, name in enumerate(view_of_image) if name == view]
        index = torch.tensor(images, device=guide.device)
        features = batch.features[view].index_select(0, index)
        predicted = upsampler(features, guide.index_select(0, index), output_size)
        for j, k in enumerate(images):
            outputs[k] = predicted[j]
    return torch.stack(outputs)  # type: ignore[arg-type]


@register_objective("jafar")
class JafarObjective(DrawnObjective):
    """JAFAR's objective; see the module docstring."""

    views = VIEWS
    sums = tuple(
        f"{quantity}_{method}_{ratio}"
        for ratio in VALIDATION_FACTORS
        for method in ("upsampler", "bilinear")
        for quantity in ("cosine", "loss")
    )
    description = (
        "JAFAR: reconstruction_loss(U(f(img*u), bilinear_half(img), grid of f(img)), f(img)) with JAFAR's "
        "cosine + target-normalised MSE; u drawn per image and epoch from the cached views "
        f"{', '.join(f'{u:g}' for u in DOWNSCALE_FACTORS)}; views resized once from the original by torch's "
        "antialiased bicubic; frozen backbone; featlift's Adam loop"
    )

    def drawn_views(self, upsampler: Upsampler, batch: Batch) -> list[str]:
        """This epoch's downscaled view of every image of the batch."""
        return [
            downscaled_view_name(
                DOWNSCALE_FACTORS[int(torch.randint(len(DOWNSCALE_FACTORS), (1,), generator=g))]
            )
            for g in self.draw_generators(batch, batch.pixels[FULL_VIEW], "jafar-downscale")
        ]

    def loss(self, upsampler: Upsampler, batch: Batch) -> torch.Tensor:
        target = batch.features[FULL_VIEW]
        views = self.drawn_views(upsampler, batch)
        pred = upsample_views(upsampler, batch, views, jafar_guide(batch), tuple(target.shape[-2:]))
        return reconstruction_loss(pred, target)

    def validation_sums(self, upsampler: Upsampler, batch: Batch) -> torch.Tensor:
        target = batch.features[FULL_VIEW]
        size = tuple(target.shape[-2:])
        guide = jafar_guide(batch)
        sums = []
        for factor in VALIDATION_FACTORS.values():
            features = batch.features[downscaled_view_name(factor)]
            bilinear = F.interpolate(features, size=size, mode="bilinear", align_corners=False)
            for pred in (upsampler(features, guide, size), bilinear):
                cosine_term, mse_term = reconstruction_terms(pred, target)
                sums += [(1.0 - cosine_term).sum(), (cosine_term + mse_term).sum()]
        return torch.stack(sums).double()

    def validation_metrics(self, sums: dict[str, float], images: int) -> dict[str, Any]:
        return {f"val_{name}": round(total / images, 5) for name, total in sums.items()}
