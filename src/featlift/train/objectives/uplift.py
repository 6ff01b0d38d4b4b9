"""UPLiFT's training objective (Walmer et al., CVPR 2026, github.com/mwalmer-umd/UPLiFT ``train_uplift.py``).

What the original computes per batch (``configs/uplift_dinov2-s14.yaml``: 448 px images, ``down_steps: 3``,
``multi_step: True``, L2 loss): the image at ``S`` and its downsamplings to ``S/2``, ``S/4``, ``S/8``, each
with its frozen backbone features ``f1, f2, f4, f8``. For each depth ``i = 1, 2, 3`` UPLiFT runs ``i`` steps
from ``f(S/2**i)``, guided by the image at ``S/2**i`` (encoded once), and every step's output is compared with
the backbone's features of the image at that step's scale:

    loss = MSE(U1(f2), f1)
         + MSE(U1(f4), f2) + MSE(U2(f4), f1)
         + MSE(U1(f8), f4) + MSE(U2(f8), f2) + MSE(U3(f8), f1)

(``Uk(f)`` is the output of step ``k``; six terms, each a mean over all elements, summed.)

featlift's version is this loss on the views ``s1, s2, s4, s8`` (`View` scales 1, 1/2, 1/4, 1/8), cached like
every view, so ``--image-size`` must make ``S/8`` a whole number of patches (448 for patch 14). Differences:
the views are resized once from the original image by featlift's antialiased bicubic resize (the original: a
torchvision resize of the image to ``S x S``, then torchvision's antialiased bilinear resize of that, already
normalised, to each smaller size); training uses the ``featlift train`` loop (Adam, ``--lr``, epochs); the
original's defaults are Adam at lr 1e-3, batch 32, one epoch of ImageNet. ``--loss`` does not apply (the loss
is the original's L2).

Validation (held-out images): at 2x (``s2 -> s1``, one step) and 4x (``s4 -> s1``, two steps), the mean over
the images of the MSE and the cosine to ``f1`` of the upsampler and of bilinear upsampling of the same input.
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

DEPTHS = 3  # the original's train.down_steps for DINOv2-S/14
VIEWS = tuple(View(f"s{2**k}", 1.0 / 2**k) for k in range(DEPTHS + 1))  # s1, s2, s4, s8
VALIDATION_DEPTHS = {"2x": 1, "4x": 2}


def multi_step_terms(
    upsampler: Upsampler, features: dict[str, torch.Tensor], guides: dict[str, torch.Tensor]
):
    """The original's loss terms: for each depth i, every step k of i steps from view ``s{2**i}`` against the
    view ``s{2**(i-k)}``; yields (name, MSE)."""
    for depth in range(1, DEPTHS + 1):
        source = f"s{2**depth}"
        outputs = upsampler.upsample_steps(features[source], guides[source], depth)
        for step, pred in enumerate(outputs, start=1):
            target = f"s{2 ** (depth - step)}"
            yield f"{source}_to_{target}", F.mse_loss(pred, features[target])


@register_objective("uplift")
class UpliftObjective(Objective):
    """UPLiFT's objective; see the module docstring."""

    views = VIEWS
    own_loss = "l2"
    sums = tuple(
        f"{quantity}_{method}_{ratio}"
        for ratio in VALIDATION_DEPTHS
        for method in ("upsampler", "bilinear")
        for quantity in ("mse", "cosine")
    )
    description = (
        "UPLiFT: sum over depths i = 1..3 and steps k = 1..i of MSE(step k of UPLiFT from f(img/2**i) guided by "
        "img/2**i, f(img/2**(i-k))); views resized once from the original by torch's antialiased bicubic; "
        "frozen backbone; featlift's Adam loop"
    )

    def loss(self, upsampler: Upsampler, batch: Batch) -> torch.Tensor:
        guides = {view.name: batch.guide(view.name, stream=k) for k, view in enumerate(VIEWS[1:], start=1)}
        return sum(term for _, term in multi_step_terms(upsampler, batch.features, guides))

    def validation_sums(self, upsampler: Upsampler, batch: Batch) -> torch.Tensor:
        target = batch.features["s1"]
        sums = []
        for depth in VALIDATION_DEPTHS.values():
            source = f"s{2**depth}"
            features = batch.features[source]
            pred = upsampler.upsample_steps(features, batch.guide(source), depth)[-1]
            bilinear = F.interpolate(features, size=target.shape[-2:], mode="bilinear", align_corners=False)
            for out in (pred, bilinear):
                sums += [
                    (out - target).square().mean(dim=(1, 2, 3)).sum(),
                    cosine_map(out, target).mean(dim=(1, 2)).sum(),
                ]
        return torch.stack(sums).double()

    def validation_metrics(self, sums: dict[str, float], images: int) -> dict[str, Any]:
        return {f"val_{name}": round(total / images, 5) for name, total in sums.items()}
