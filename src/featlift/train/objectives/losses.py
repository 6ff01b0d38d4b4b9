"""Feature distances for objectives: ``--loss`` (cosine distance, L1, L2) and the per-position cosine."""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("cosine", "l1", "l2")


def feature_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """``[B, C, H, W]`` prediction and target -> scalar loss: ``1 - cos`` over channels (mean over positions),
    L1 or L2 (MSE)."""
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(pred, target, dim=1)).mean()
    if kind == "l1":
        return F.l1_loss(pred, target)
    if kind == "l2":
        return F.mse_loss(pred, target)
    raise ValueError(f"unknown loss {kind!r}; expected one of {', '.join(LOSSES)}")


def cosine_map(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-position cosine similarity ``[B, H, W]``."""
    return F.cosine_similarity(pred.float(), target.float(), dim=1)
