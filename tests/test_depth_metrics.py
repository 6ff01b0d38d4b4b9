"""Known answers of the depth metrics (RMSE, delta1/2/3, abs rel) and the scale-and-shift alignment."""

from __future__ import annotations

import math

import pytest
import torch

from featlift.evaluate.depth_metrics import (
    DepthMetricMeans,
    image_depth_metrics,
    scale_and_shift_aligned,
    valid_depth_mask,
)


def test_twice_the_truth_everywhere():
    """pred = 2 gt: every ratio is 2, not below 1.25, 1.5625 nor 1.953125 -> delta1 = delta2 = delta3 = 0;
    abs rel = mean |2g - g| / g = 1; RMSE = sqrt(mean g^2) = rms(gt) = sqrt((1 + 4 + 9 + 16) / 4) = sqrt(7.5)."""
    gt = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    metrics = image_depth_metrics(2 * gt, gt, torch.ones_like(gt, dtype=torch.bool))
    assert metrics == pytest.approx(
        {"rmse": math.sqrt(7.5), "abs_rel": 1.0, "delta1": 0.0, "delta2": 0.0, "delta3": 0.0}
    )


def test_mixed_case_by_hand_with_invalid_pixels_excluded():
    """gt   = [2, 4, 5, 0 (no depth), 12 (> max 10), 1]
    pred = [2, 3, 10, 7,          3,             0.5]
    valid: gt 2, 4, 5, 1 (the 0 and the 12 are left out, whatever is predicted there).
    errors: 0, -1, 5, -0.5 -> RMSE = sqrt((0 + 1 + 25 + 0.25) / 4) = sqrt(6.5625) = 2.5617...
    abs rel: (0 + 1/4 + 5/5 + 0.5/1) / 4 = 1.75 / 4 = 0.4375
    ratios max(p/g, g/p): 1, 4/3 = 1.333, 2, 2 -> delta1 (< 1.25): 1/4; delta2 (< 1.5625): 2/4;
    delta3 (< 1.953125): 2/4."""
    gt = torch.tensor([2.0, 4.0, 5.0, 0.0, 12.0, 1.0])
    pred = torch.tensor([2.0, 3.0, 10.0, 7.0, 3.0, 0.5])
    valid = valid_depth_mask(gt, max_depth=10.0)
    assert valid.tolist() == [True, True, True, False, False, True]
    metrics = image_depth_metrics(pred, gt, valid)
    assert metrics == pytest.approx(
        {"rmse": math.sqrt(6.5625), "abs_rel": 0.4375, "delta1": 0.25, "delta2": 0.5, "delta3": 0.5}
    )


def test_invalid_values_and_non_positive_predictions():
    gt = torch.tensor([float("nan"), float("inf"), -1.0, 0.0, 3.0, 3.0])
    assert valid_depth_mask(gt).tolist() == [False, False, False, False, True, True]
    # a prediction of 0 or below is never within a threshold (its ratio is infinite), but counts in RMSE
    metrics = image_depth_metrics(torch.tensor([0, 0, 0, 0, 0.0, -3.0]), gt, valid_depth_mask(gt))
    assert metrics["delta3"] == 0.0
    assert metrics["rmse"] == pytest.approx(math.sqrt((9 + 36) / 2))
    assert metrics["abs_rel"] == pytest.approx((1 + 2) / 2)
    assert image_depth_metrics(gt, gt, torch.zeros(6, dtype=torch.bool)) is None


def test_image_average_and_images_without_depth():
    """Two images: perfect (RMSE 0, delta1 1) and all-off by +1 m on gt 1 (RMSE 1, delta1 0, abs rel 1):
    means RMSE 0.5, delta1 0.5, abs rel 0.5. An image with no valid pixel is counted apart, not averaged.
    Pooling the pixels instead (3 perfect + 1 off) would give RMSE 0.5 too but delta1 0.75: the image mean
    is what Probe3D reports."""
    means = DepthMetricMeans()
    means.add(torch.full((3,), 2.0), torch.full((3,), 2.0), torch.ones(3, dtype=torch.bool))
    means.add(torch.full((1,), 2.0), torch.full((1,), 1.0), torch.ones(1, dtype=torch.bool))
    means.add(torch.full((4,), 2.0), torch.zeros(4), torch.zeros(4, dtype=torch.bool))
    assert means.images == 2 and means.images_without_valid_depth == 1
    result = means.means()
    assert result["rmse"] == pytest.approx(0.5)
    assert result["delta1"] == pytest.approx(0.5)
    assert result["abs_rel"] == pytest.approx(0.5)
    assert math.isnan(DepthMetricMeans().means()["rmse"])


def test_scale_and_shift_alignment_recovers_an_affine_prediction():
    """pred = (gt - 1) / 3 is off in scale and shift; the least-squares fit maps it back to gt exactly
    (scale 3, shift 1), so the aligned metrics are perfect while the raw ones are not; invalid pixels
    (here gt 0 with a wild prediction) take no part in the fit."""
    gt = torch.tensor([[1.5, 2.0, 3.0], [4.0, 6.0, 0.0]])
    pred = (gt - 1) / 3
    pred[1, 2] = 100.0
    valid = valid_depth_mask(gt)
    aligned = scale_and_shift_aligned(pred, gt, valid)
    assert aligned[valid].tolist() == pytest.approx(gt[valid].tolist())
    means = DepthMetricMeans()
    means.add(pred, gt, valid)
    assert means.aligned_means()["rmse"] == pytest.approx(0.0, abs=1e-9)
    assert means.aligned_means()["delta1"] == 1.0
    assert means.means()["delta1"] == 0.0
    constant = torch.full_like(gt, 2.0)
    assert torch.equal(scale_and_shift_aligned(constant, gt, valid), constant)  # degenerate: left as is
