"""Semantic-segmentation metrics: the confusion matrix over labelled pixels, per-class IoU, mIoU, pixel accuracy."""

from __future__ import annotations

import torch

IGNORE = 255


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[K, K]`` counts (rows: ground truth, columns: prediction) over pixels whose target is not `IGNORE`."""
    if pred.shape != target.shape:
        raise ValueError(
            f"prediction shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}"
        )
    keep = target != IGNORE
    truth, guess = target[keep].long(), pred[keep].long()
    if truth.numel() and (int(truth.max()) >= num_classes or int(truth.min()) < 0):
        raise ValueError(f"target holds class {int(truth.max())}: expected 0..{num_classes - 1} or {IGNORE}")
    index = truth * num_classes + guess
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_from_confusion(confusion: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class IoU ``TP / (TP + FP + FN)`` and a mask of the classes present in the ground truth."""
    confusion = confusion.double()
    tp = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp_min(1), torch.zeros_like(tp))
    return iou, confusion.sum(1) > 0


def mean_iou(confusion: torch.Tensor) -> float:
    """mIoU x100 over the classes present in the ground truth (NaN when no pixel is labelled)."""
    iou, present = iou_from_confusion(confusion)
    return 100 * float(iou[present].mean()) if present.any() else float("nan")


def pixel_accuracy(confusion: torch.Tensor) -> float:
    """Correct labelled pixels / labelled pixels, x100."""
    return 100 * float(confusion.diag().sum() / confusion.sum().clamp_min(1))
