"""The one keypoint matcher of the correspondence tasks (``warp``, ``spair``): cosine nearest neighbours.

Coordinates are normalised image coordinates ``(x, y)``: ``(0, 0)`` is the top-left corner of the image,
``(1, 1)`` its bottom-right corner, so pixel column ``i`` of a ``W``-pixel-wide image covers
``[i / W, (i + 1) / W]`` and has its centre at ``(i + 0.5) / W``, whatever size the image is resized to.
A feature grid is taken to cover its image exactly: cell ``(r, c)`` of an ``h x w`` grid has its centre at
``((c + 0.5) / w, (r + 0.5) / h)``. `pixel_indices_to_normalized` and `normalized_to_pixel_indices`
convert from and to pixel indices (integer values at pixel centres, as SPair-71k's annotations).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def match_keypoints(source: torch.Tensor, target: torch.Tensor, points: np.ndarray) -> np.ndarray:
    """Nearest-neighbour matches of keypoints between two feature maps ``[C, h, w]`` (any two grid sizes).

    Each normalised source point ``(x, y)`` (``[N, 2]``) is described by bilinear sampling of `source`
    (points in the outer half cell take the border cells' values); its match is the centre of the `target`
    cell with the highest cosine similarity. Returns the matches, normalised ``[N, 2]`` float64.
    """
    grid = torch.from_numpy(np.asarray(points, dtype=np.float64).reshape(-1, 2) * 2 - 1).float()
    descriptors = F.grid_sample(
        source[None].float(), grid[None, None], mode="bilinear", padding_mode="border", align_corners=False
    )[0, :, 0]  # [C, N]
    descriptors = F.normalize(descriptors, dim=0)
    channels, height, width = target.shape
    cells = F.normalize(target.float().reshape(channels, -1), dim=0)  # [C, h*w]
    best = (descriptors.T @ cells).argmax(1).numpy()
    return np.stack([(best % width + 0.5) / width, (best // width + 0.5) / height], axis=1)


def pixel_indices_to_normalized(points: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``[N, 2]`` pixel indices (x, y) of an image of `size` = (width, height) -> normalised coordinates."""
    return (np.asarray(points, dtype=np.float64).reshape(-1, 2) + 0.5) / np.asarray(size, dtype=np.float64)


def normalized_to_pixel_indices(points: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Normalised coordinates ``[N, 2]`` -> pixel indices (x, y) of an image of `size` = (width, height)."""
    return np.asarray(points, dtype=np.float64) * np.asarray(size, dtype=np.float64) - 0.5
