"""The LiFT training objective and the validation metric.

For an image resized to ``S`` and its antialiased downsamplings to ``S/2`` and ``S/4``, with frozen
backbone features ``f1 = f(S)``, ``f2 = f(S/2)``, ``f4 = f(S/4)``:

    loss = L(LiFT(img/2, f2), f1) + L(LiFT(img/4, f4), f2)

where ``L`` is the cosine distance (``1 - cos`` over channels, mean over positions), L1 or L2 (MSE).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..upsamplers import Upsampler

LOSSES = ("cosine", "l1", "l2")


def feature_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """``[B, C, H, W]`` prediction and target -> scalar loss."""
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(pred, target, dim=1)).mean()
    if kind == "l1":
        return F.l1_loss(pred, target)
    if kind == "l2":
        return F.mse_loss(pred, target)
    raise ValueError(f"unknown loss {kind!r}; expected one of {', '.join(LOSSES)}")


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


def cosine_map(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-position cosine similarity ``[B, H, W]``."""
    return F.cosine_similarity(pred.float(), target.float(), dim=1)


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
