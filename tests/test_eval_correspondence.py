"""The one keypoint matcher of warp and spair: known answers in its documented coordinate convention."""

from __future__ import annotations

import numpy as np
import torch

from featlift.evaluate.correspondence import (
    match_keypoints,
    normalized_to_pixel_indices,
    pixel_indices_to_normalized,
)


def one_hot_grid(height: int, width: int) -> torch.Tensor:
    """``[h*w, h, w]``: cell (r, c) has the feature e_(r*w + c); distinct cells are orthogonal."""
    return torch.eye(height * width).reshape(height * width, height, width)


def test_known_answers_on_a_two_by_two_grid():
    """Cells of a 2x2 grid have their centres at 0.25 and 0.75. Point (0.3, 0.7) sits at grid coordinates
    (0.3 * 2 - 0.5, 0.7 * 2 - 0.5) = (0.1, 0.9): bilinear weights 0.9 * 0.9 = 0.81 on cell (row 1, col 0),
    0.09 on (0, 0) and on (1, 1), 0.01 on (0, 1), so it is most like cell (1, 0), centre (0.25, 0.75).
    The same point against the grid mirrored left-right matches the mirrored cell, centre (0.75, 0.75)."""
    grid = one_hot_grid(2, 2)
    points = np.array([[0.3, 0.7], [0.25, 0.25], [0.9, 0.1]])
    assert match_keypoints(grid, grid, points).tolist() == [[0.25, 0.75], [0.25, 0.25], [0.75, 0.25]]
    mirrored = grid.flip(-1)
    assert match_keypoints(grid, mirrored, points).tolist() == [[0.75, 0.75], [0.75, 0.25], [0.25, 0.25]]


def test_a_coarse_source_against_a_finer_target_lands_on_the_fine_cell_centres():
    """A 1x2 source grid (left e0, right e1) against a 2x4 target whose left half is e0 and right half e1,
    except the top-left cell (e1): point (0.1, 0.9) is the left source cell; the best target cells are the
    three e0 ones, of which argmax takes the first in row-major order, (row 0, col 1), centre (0.375, 0.25)."""
    source = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # [2, 1, 2]
    target = torch.zeros(2, 2, 4)
    target[0, :, :2] = 1
    target[1, :, 2:] = 1
    target[:, 0, 0] = torch.tensor([0.0, 1.0])
    assert match_keypoints(source, target, np.array([[0.1, 0.9]])).tolist() == [[0.375, 0.25]]


def test_pixel_indices_round_trip_and_hit_pixel_centres():
    """Pixel index 0 of a 4-pixel-wide image is the centre of [0, 1/4]: normalised 0.125; index 3 -> 0.875."""
    size = (4, 2)  # (width, height)
    pixels = np.array([[0.0, 0.0], [3.0, 1.0]])
    normalized = pixel_indices_to_normalized(pixels, size)
    assert normalized.tolist() == [[0.125, 0.25], [0.875, 0.75]]
    assert np.allclose(normalized_to_pixel_indices(normalized, size), pixels)
