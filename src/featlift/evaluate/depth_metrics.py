"""Monocular depth metrics as Probe3D (El Banani et al., CVPR 2024) computes them, plus abs rel.

Per image, over its valid pixels ``V`` (ground truth finite, ``> 0`` and ``<= max_depth``; NYUv2 stores 0
where the sensor gave no depth, and Probe3D sets depths beyond 10 m to 0):

- ``rmse``     = sqrt(mean over V of (pred - gt)^2), in the unit of the depths (metres);
- ``abs_rel``  = mean over V of |pred - gt| / gt;
- ``delta1``   = fraction of V with max(pred / gt, gt / pred) < 1.25 (``delta2``, ``delta3``: 1.25^2, 1.25^3);
  a prediction <= 0 never counts as within a threshold.

The metrics of a set of images are the means of the per-image values (Probe3D's image average), over the
images that have at least one valid pixel; an image without any is counted apart (Probe3D would count it with
RMSE 0 and delta 0). ``scale_and_shift_aligned`` is Probe3D's "scale-invariant" variant of the same metrics:
each prediction is first mapped by the least-squares scale and shift that best fit it to the ground truth on V.
"""

from __future__ import annotations

import math

import torch

DELTA_BASE = 1.25
METRIC_NAMES = ("rmse", "abs_rel", "delta1", "delta2", "delta3")


def valid_depth_mask(depth: torch.Tensor, max_depth: float | None = None) -> torch.Tensor:
    """Pixels with a usable ground truth: finite, ``> 0`` and (when given) ``<= max_depth``."""
    valid = torch.isfinite(depth) & (depth > 0)
    if max_depth is not None:
        valid &= depth <= max_depth
    return valid


def image_depth_metrics(pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor) -> dict[str, float] | None:
    """The metrics of one ``[H, W]`` prediction against its ground truth over the `valid` pixels (float64);
    None when no pixel is valid."""
    if pred.shape != gt.shape or valid.shape != gt.shape:
        raise ValueError(
            f"prediction {tuple(pred.shape)}, ground truth {tuple(gt.shape)} and mask {tuple(valid.shape)} "
            "must have the same shape"
        )
    pred, gt = pred[valid].double(), gt[valid].double()
    if gt.numel() == 0:
        return None
    error = pred - gt
    ratio = torch.maximum(pred / gt, gt / pred.clamp_min(1e-12))  # pred <= 0: gt / 1e-12, never within
    metrics = {
        "rmse": float(error.square().mean().sqrt()),
        "abs_rel": float((error.abs() / gt).mean()),
    }
    for power in (1, 2, 3):
        metrics[f"delta{power}"] = float((ratio < DELTA_BASE**power).double().mean())
    return metrics


def scale_and_shift_aligned(pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """`pred` mapped by ``s * pred + t``, with ``(s, t)`` minimising ``sum over valid of (s * pred + t - gt)^2``
    (Probe3D's scale-invariant evaluation); unchanged when the fit is degenerate (fewer than two distinct
    predicted values on the valid pixels)."""
    p, g = pred[valid].double(), gt[valid].double()
    n = p.numel()
    if n < 2:
        return pred
    sum_p, sum_g = p.sum(), g.sum()
    sum_pp, sum_pg = (p * p).sum(), (p * g).sum()
    det = n * sum_pp - sum_p * sum_p
    if float(det) <= 1e-12 * max(1.0, float(n * sum_pp)):
        return pred
    scale = (n * sum_pg - sum_p * sum_g) / det
    shift = (sum_pp * sum_g - sum_p * sum_pg) / det
    return (pred.double() * scale + shift).to(pred.dtype)


class DepthMetricMeans:
    """Accumulates per-image metrics (as measured, and after scale-and-shift alignment) over a set of images."""

    def __init__(self) -> None:
        self.sums = {name: 0.0 for name in METRIC_NAMES}
        self.aligned_sums = {name: 0.0 for name in METRIC_NAMES}
        self.images = 0
        self.images_without_valid_depth = 0

    def add(self, pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor) -> None:
        """One image's ``[H, W]`` prediction, ground truth and valid mask."""
        metrics = image_depth_metrics(pred, gt, valid)
        if metrics is None:
            self.images_without_valid_depth += 1
            return
        aligned = image_depth_metrics(scale_and_shift_aligned(pred, gt, valid), gt, valid)
        self.images += 1
        for name in METRIC_NAMES:
            self.sums[name] += metrics[name]
            self.aligned_sums[name] += aligned[name]

    def means(self) -> dict[str, float]:
        """Mean of each metric over the images with valid depth (NaN when there is none)."""
        return {name: self.sums[name] / self.images if self.images else math.nan for name in METRIC_NAMES}

    def aligned_means(self) -> dict[str, float]:
        """The same after each prediction's scale-and-shift alignment (Probe3D's scale-invariant metrics)."""
        return {
            name: self.aligned_sums[name] / self.images if self.images else math.nan for name in METRIC_NAMES
        }
