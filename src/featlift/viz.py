"""Pictures of dense features: cosine-similarity maps of chosen points, and PCA to RGB, per feature variant.

Library functions (usable from Python; the ``featlift viz`` command wraps them):

- `variant_features`: one image through several `FeatureVariant`s -> ``[C, h, w]`` maps;
- `similarity_map`: cosine similarity of the feature under a pixel with every cell of the map;
- `pca_rgb`: the first three principal components of feature maps as RGB in ``[0, 1]``, fitted jointly
  across maps by default so that the same colour means the same feature direction in every panel;
- `render_similarity_figure` / `render_pca_figure`: PNGs in the style of the LiFT paper's figures
  (the image, then one panel per variant), written atomically.

Matplotlib is imported lazily and used through its object API (``Figure`` + Agg canvas), so importing
featlift or calling these functions never changes the global pyplot backend.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import FeatliftError
from .fileio import atomic_path
from .images import image_to_tensor
from .variants import FeatureVariant

logger = logging.getLogger(__name__)

DEFAULT_PANEL = 256
_TITLE_PX = 28
_DPI = 100
_QUANTILES = torch.tensor([0.01, 0.99], dtype=torch.float64)


def variant_features(
    variants: Sequence[FeatureVariant],
    image: Image.Image,
    base: tuple[int, int],
    device: str | torch.device = "cpu",
) -> list[torch.Tensor]:
    """Features ``[C, h, w]`` (float32, CPU) of `image` for each variant, each fed at ``variant.input_size(base)``.

    A method guided by the image at the output size or its own size (`FeaturePipeline.wants_sources`)
    also gets `image` at its own size, as ``featlift extract`` gives it the decoded file.
    """
    out = []
    source = None
    for variant in variants:
        tensor = image_to_tensor(image, variant.input_size(base))[None].to(device)
        if variant.pipeline.wants_sources:
            source = source if source is not None else image_to_tensor(image)[None].to(device)
            features = variant.pipeline(tensor, source)
        else:
            features = variant(tensor)
        out.append(features[0].float().cpu())
    return out


def similarity_map(
    features: torch.Tensor, point: tuple[float, float], image_size: tuple[int, int]
) -> torch.Tensor:
    """Cosine similarity ``[h, w]`` of the feature at `point` with every cell of `features`.

    Args:
        features: ``[C, h, w]``, covering the whole image (whatever resize produced it).
        point: (x, y) in pixels of the original image; its feature is sampled bilinearly on the grid.
        image_size: the original image's (width, height).
    """
    if features.ndim != 3:
        raise ValueError(f"features must be [C, h, w], got {tuple(features.shape)}")
    x, y = point
    width, height = image_size
    grid = torch.tensor([[[[(x + 0.5) / width * 2 - 1, (y + 0.5) / height * 2 - 1]]]], dtype=torch.float32)
    feats = features.float()
    query = F.grid_sample(feats[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[
        0, :, 0, 0
    ]
    return torch.einsum("c,chw->hw", F.normalize(query, dim=0), F.normalize(feats, dim=0))


def pca_rgb(
    features: Sequence[torch.Tensor], joint: bool = True, max_samples: int = 20000, seed: int = 0
) -> list[np.ndarray]:
    """First three principal components of each ``[C, h, w]`` map as an ``[h, w, 3]`` RGB array in ``[0, 1]``.

    With ``joint=True`` one basis (and one colour scale: the 1st-99th percentile of each component) is
    fitted on cells drawn equally from every map, so colours are comparable across maps; otherwise each
    map gets its own. At most `max_samples` cells (seeded draw) are used for the fit.
    """
    generator = torch.Generator().manual_seed(seed)
    flats = [f.float().reshape(f.shape[0], -1).T for f in features]  # [N_i, C]

    def fit(samples: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        per = max(1, max_samples // len(samples))
        picked = [s[torch.randperm(len(s), generator=generator)[:per]] for s in samples]
        data = torch.cat(picked).double()
        mean = data.mean(0)
        _, _, vh = torch.linalg.svd(data - mean, full_matrices=False)
        basis = vh[:3].T  # [C, 3]
        if basis.shape[1] < 3:
            basis = torch.cat([basis, torch.zeros(basis.shape[0], 3 - basis.shape[1], dtype=basis.dtype)], 1)
        return mean, basis

    def colour(flat: torch.Tensor, mean: torch.Tensor, basis: torch.Tensor, low, high) -> torch.Tensor:
        return ((flat.double() - mean) @ basis - low) / (high - low).clamp_min(1e-12)

    results = []
    if joint:
        mean, basis = fit(flats)
        projected = torch.cat([(f.double() - mean) @ basis for f in flats])
        low, high = torch.quantile(projected, _QUANTILES, dim=0)
        for feat, flat in zip(features, flats, strict=True):
            rgb = colour(flat, mean, basis, low, high).clamp(0, 1)
            results.append(rgb.reshape(feat.shape[1], feat.shape[2], 3).float().numpy())
        return results
    for feat, flat in zip(features, flats, strict=True):
        mean, basis = fit([flat])
        projected = (flat.double() - mean) @ basis
        low, high = torch.quantile(projected, _QUANTILES, dim=0)
        rgb = colour(flat, mean, basis, low, high).clamp(0, 1)
        results.append(rgb.reshape(feat.shape[1], feat.shape[2], 3).float().numpy())
    return results


def _panel_height(image: Image.Image, panel: int) -> int:
    return max(1, round(panel * image.height / image.width))


def _figure(columns: int, rows: int, panel: int, panel_h: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    width, height = columns * panel, rows * panel_h + _TITLE_PX
    figure = Figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI, facecolor="white")
    FigureCanvasAgg(figure)

    def axes(row: int, col: int):
        ax = figure.add_axes(
            [
                col * panel / width,
                1 - (_TITLE_PX + (row + 1) * panel_h) / height,
                panel / width,
                panel_h / height,
            ]
        )
        ax.set_axis_off()
        return ax

    def title(col: int, text: str) -> None:
        figure.text(
            (col + 0.5) * panel / width,
            1 - 0.5 * _TITLE_PX / height,
            text,
            ha="center",
            va="center",
            fontsize=9,
        )

    return figure, axes, title


def _save(figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise FeatliftError(f"{path}: the output must be a .png file")
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=_DPI)
    return path


def short_label(variant_label: str) -> str:
    """A panel title for a variant spec: ``none`` -> ``backbone``; a checkpoint path -> its folder name."""
    if variant_label == "none":
        return "backbone"
    name, *parts = variant_label.split(":")
    parts = [p if "=" in p else Path(p.rstrip("/\\")).name or p for p in parts]
    return ":".join([name, *parts])


def _title(variant_label: str, grid: tuple[int, int], panel: int) -> str:
    text = f"{short_label(variant_label)} ({grid[0]}x{grid[1]})"
    limit = max(8, panel // 7)  # about 7 px per character at fontsize 9
    return text if len(text) <= limit else "…" + text[-(limit - 1) :]


def render_similarity_figure(
    image: Image.Image,
    points: Sequence[tuple[float, float]],
    labels: Sequence[str],
    maps: Sequence[Sequence[torch.Tensor | np.ndarray]],
    path: str | os.PathLike,
    panel: int = DEFAULT_PANEL,
    cmap: str = "jet",
) -> Path:
    """PNG: one row per point (the image with the point, then ``maps[point][variant]``), one column per variant.

    Each row shares one colour scale (its min to max over the variants); maps are stretched to the image's
    aspect ratio and shown with nearest-neighbour interpolation, so each panel shows its true grid resolution.
    The PNG is ``(1 + len(labels)) * panel`` pixels wide and ``len(points) * panel * H / W + 28`` high.
    """
    panel_h = _panel_height(image, panel)
    figure, axes, title = _figure(1 + len(labels), len(points), panel, panel_h)
    extent = (0, image.width, image.height, 0)
    title(0, "image")
    for col, label in enumerate(labels, start=1):
        grid = tuple(np.asarray(maps[0][col - 1]).shape) if points else (0, 0)
        title(col, _title(label, grid, panel))
    for row, (x, y) in enumerate(points):
        ax = axes(row, 0)
        ax.imshow(np.asarray(image), extent=extent)
        ax.plot(
            [x],
            [y],
            marker="o",
            markersize=7,
            markerfacecolor="red",
            markeredgecolor="white",
            markeredgewidth=1.5,
        )
        ax.set_xlim(0, image.width)
        ax.set_ylim(image.height, 0)
        row_maps = [np.asarray(m, dtype=np.float32) for m in maps[row]]
        low = min(float(m.min()) for m in row_maps)
        high = max(float(m.max()) for m in row_maps)
        for col, similarity in enumerate(row_maps, start=1):
            ax = axes(row, col)
            ax.imshow(
                similarity,
                cmap=cmap,
                vmin=low,
                vmax=high,
                extent=extent,
                interpolation="nearest",
                aspect="auto",
            )
            ax.plot([x], [y], marker="+", markersize=8, color="white", markeredgewidth=1.5)
            ax.set_xlim(0, image.width)
            ax.set_ylim(image.height, 0)
    return _save(figure, path)


def render_pca_figure(
    image: Image.Image,
    labels: Sequence[str],
    rgbs: Sequence[np.ndarray],
    path: str | os.PathLike,
    panel: int = DEFAULT_PANEL,
) -> Path:
    """PNG: the image, then each ``[h, w, 3]`` PCA map of `rgbs` (one column per label), nearest interpolation."""
    panel_h = _panel_height(image, panel)
    figure, axes, title = _figure(1 + len(labels), 1, panel, panel_h)
    extent = (0, image.width, image.height, 0)
    title(0, "image")
    axes(0, 0).imshow(np.asarray(image), extent=extent, aspect="auto")
    for col, (label, rgb) in enumerate(zip(labels, rgbs, strict=True), start=1):
        title(col, _title(label, rgb.shape[:2], panel))
        axes(0, col).imshow(rgb, extent=extent, interpolation="nearest", aspect="auto")
    return _save(figure, path)


def check_points(points: Sequence[tuple[float, float]], image_size: tuple[int, int]) -> None:
    """Raise `FeatliftError` for a point outside an image of `image_size` = (W, H)."""
    width, height = image_size
    for x, y in points:
        if not (0 <= x < width and 0 <= y < height):
            raise FeatliftError(
                f"point {x:g},{y:g} lies outside the {width}x{height} (WxH) image; expected 0 <= x < W, 0 <= y < H"
            )


def similarity_figure(
    variants: Sequence[FeatureVariant],
    image: Image.Image,
    points: Sequence[tuple[float, float]],
    path: str | os.PathLike,
    base: tuple[int, int] = (224, 224),
    device: str | torch.device = "cpu",
    panel: int = DEFAULT_PANEL,
) -> Path:
    """Features of every variant, similarity maps of every point, rendered to `path` (a PNG)."""
    if not points:
        raise FeatliftError("give at least one point (x, y) in image pixels")
    check_points(points, (image.width, image.height))
    features = variant_features(variants, image, base, device)
    maps = [[similarity_map(f, p, (image.width, image.height)) for f in features] for p in points]
    return render_similarity_figure(image, points, [v.label for v in variants], maps, path, panel)


def pca_figure(
    variants: Sequence[FeatureVariant],
    image: Image.Image,
    path: str | os.PathLike,
    base: tuple[int, int] = (224, 224),
    device: str | torch.device = "cpu",
    panel: int = DEFAULT_PANEL,
    joint: bool = True,
) -> Path:
    """Features of every variant as PCA RGB (joint basis by default), rendered to `path` (a PNG)."""
    features = variant_features(variants, image, base, device)
    return render_pca_figure(image, [v.label for v in variants], pca_rgb(features, joint=joint), path, panel)
