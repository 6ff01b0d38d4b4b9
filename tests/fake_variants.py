"""Stand-in feature variants with features known by construction, for known-answer tests of the eval tasks.

They offer what the tasks use of a `FeatureVariant`: ``label``, ``input_size``, ``output_grid``,
``pipeline.backbone.grid_size`` and ``variant(images)`` -> ``[B, C, H / cell, W / cell]``.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F


class CellFeatures:
    """A variant on a grid of `cell` x `cell` pixel cells; subclasses say what each cell's feature is."""

    label = "cell-features"

    def __init__(self, cell: int = 8):
        self.cell = cell
        self.pipeline = SimpleNamespace(backbone=SimpleNamespace(grid_size=self.grid_size))

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        return height // self.cell, width // self.cell

    def input_size(self, base: tuple[int, int]) -> tuple[int, int]:
        return tuple(base)

    def output_grid(self, base: tuple[int, int]) -> tuple[int, int]:
        return self.grid_size(*base)


class ColourFeatures(CellFeatures):
    """Each cell's feature is its mean colour and one minus it (6 channels): cells of different flat colours
    are linearly separable, and black has a feature too (cosine similarity needs a non-zero vector)."""

    label = "colour-features"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        mean = F.avg_pool2d(images, self.cell)
        return torch.cat([mean, 1 - mean], dim=1)


class PositionFeatures(CellFeatures):
    """Each cell's feature is a one-hot code of its position, whatever the image: a keypoint matches the
    cell at the same place in any other image."""

    label = "position-features"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        h, w = self.grid_size(*images.shape[-2:])
        return torch.eye(h * w).reshape(h * w, h, w).expand(len(images), -1, -1, -1).clone()
