"""The ``warp`` task (``featlift eval warp``): keypoint correspondence under known warps, with no annotated dataset.

Two sources of ground truth:

- homographies: each real image is warped by a random homography (its four corners moved independently by up to
  ``strength`` of the image size; seeded per image, so every run and every variant sees the same warps). The warp
  is defined in normalised coordinates, so each variant renders the source and warped image at its own input size
  from the original pixels (``input-2x`` sees real detail);
- a real stereo pair: scikit-image's ``stereo_motorcycle`` (Middlebury 2014) with ground-truth disparity: a
  left-image point ``(x, y)`` is at ``(x - d, y)`` in the right image.

A regular grid of source keypoints is matched by `featlift.evaluate.correspondence.match_keypoints`: described by
the source feature map, sampled bilinearly at each keypoint; its match is the cell of the target feature map with
the highest cosine similarity (nearest neighbour), placed at that cell's centre. PCK@alpha is the share of keypoints whose match lies within ``alpha * max(h, w)`` pixels
of the true location (h, w: the base size), over keypoints that land inside the target image (homographies) or
have a valid disparity (stereo).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import FeatliftError
from ..images import collect_images, image_to_tensor, load_image
from ..variants import FeatureVariant
from .correspondence import match_keypoints
from .report import TaskResults, VariantResult
from .runner import FeatureTimer, check_sizes, eval_settings, evaluate_each
from .task_config import TaskConfig

logger = logging.getLogger(__name__)

ALPHAS = (0.1, 0.05, 0.01)


# ------------------------------------------------------------------------------------------- geometry


def homography_from_points(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The 3x3 homography mapping 4 source points ``[4, 2]`` onto 4 target points (direct linear transform)."""
    rows = []
    for (x, y), (u, v) in zip(source, target, strict=True):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y, -u])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y, -v])
    _, _, vt = np.linalg.svd(np.asarray(rows, dtype=np.float64))
    matrix = vt[-1].reshape(3, 3)
    return matrix / matrix[2, 2]


def random_homography(rng: np.random.Generator, strength: float = 0.15) -> np.ndarray:
    """A homography of the unit square (normalised ``(x, y)`` in ``[0, 1]``) that moves each corner independently
    by up to `strength` in x and y, towards or away from the centre."""
    corners = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    moved = corners + rng.uniform(-strength, strength, size=(4, 2))
    return homography_from_points(corners, moved)


def apply_homography(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Map ``[N, 2]`` points through a 3x3 homography."""
    homogeneous = np.concatenate([points, np.ones((len(points), 1))], axis=1) @ matrix.T
    return homogeneous[:, :2] / homogeneous[:, 2:3]


def warp_image(image: torch.Tensor, matrix: np.ndarray) -> torch.Tensor:
    """Render ``[3, H, W]`` through a normalised-coordinate homography: output pixel p shows input point
    ``H^-1 p`` (bilinear; zeros outside the input)."""
    _, h, w = image.shape
    ys, xs = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij")
    points = np.stack([xs.ravel(), ys.ravel()], axis=1)
    source = apply_homography(np.linalg.inv(matrix), points).reshape(h, w, 2)
    grid = torch.from_numpy(source * 2 - 1).float()[None]  # grid_sample's [-1, 1], align_corners=False
    return F.grid_sample(image[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]


def keypoint_grid(count: int) -> np.ndarray:
    """``count x count`` keypoints at the centres of a regular grid, normalised ``(x, y)``, ``[count**2, 2]``."""
    centres = (np.arange(count) + 0.5) / count
    ys, xs = np.meshgrid(centres, centres, indexing="ij")
    return np.stack([xs.ravel(), ys.ravel()], axis=1)


# ------------------------------------------------------------------------------------------- scoring


def pck(
    predicted: np.ndarray, truth: np.ndarray, size: tuple[int, int], alphas=ALPHAS
) -> dict[float, np.ndarray]:
    """Per keypoint, whether the normalised prediction is within ``alpha * max(h, w)`` pixels of the truth."""
    h, w = size
    error = np.hypot((predicted[:, 0] - truth[:, 0]) * w, (predicted[:, 1] - truth[:, 1]) * h)
    return {alpha: error <= alpha * max(h, w) for alpha in alphas}


@dataclass
class PCKCounter:
    """Accumulates correct keypoints per alpha over many image pairs."""

    alphas: tuple[float, ...] = ALPHAS

    def __post_init__(self) -> None:
        self.correct = dict.fromkeys(self.alphas, 0)
        self.total = 0

    def add(self, hits: dict[float, np.ndarray]) -> None:
        for alpha in self.alphas:
            self.correct[alpha] += int(hits[alpha].sum())
        self.total += len(next(iter(hits.values()))) if hits else 0

    def percent(self, prefix: str = "") -> dict[str, float]:
        return {
            f"{prefix}PCK@{alpha:g}": 100 * self.correct[alpha] / self.total if self.total else float("nan")
            for alpha in self.alphas
        }


# ------------------------------------------------------------------------------------------- tasks


def homography_pck(
    timer: FeatureTimer,
    images: list[Path],
    base: tuple[int, int],
    seed: int = 0,
    strength: float = 0.15,
    keypoints: int = 20,
    counter: PCKCounter | None = None,
) -> PCKCounter:
    """PCK of one variant over `images`, each against its own seeded random homography."""
    counter = counter or PCKCounter()
    size = timer.variant.input_size(base)
    points = keypoint_grid(keypoints)
    for index, path in enumerate(images):
        matrix = random_homography(np.random.default_rng([seed, index]), strength)
        truth = apply_homography(matrix, points)
        inside = np.all((truth >= 0) & (truth <= 1), axis=1)
        if not inside.any():
            continue
        image = load_image(path)
        source = image_to_tensor(image, size)
        sources = None
        if timer.wants_sources:
            original = image_to_tensor(image)
            sources = [original, warp_image(original, matrix)]
        features = timer(torch.stack([source, warp_image(source, matrix)]), sources).float().cpu()
        matched = match_keypoints(features[0], features[1], points[inside])
        counter.add(pck(matched, truth[inside], base, counter.alphas))
    return counter


def load_stereo() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """scikit-image's Middlebury stereo pair: left, right ``[H, W, 3]`` uint8 and the left disparity ``[H, W]``."""
    try:
        from skimage import data
    except ImportError as exc:
        raise FeatliftError("the stereo check needs scikit-image: pip install scikit-image") from exc
    try:
        return data.stereo_motorcycle()
    except Exception as exc:  # pooch/network errors when the data is not bundled
        raise FeatliftError(f"cannot load skimage.data.stereo_motorcycle() ({exc})") from exc


def _stereo_left():
    from PIL import Image

    return Image.fromarray(load_stereo()[0])


def stereo_pck(
    timer: FeatureTimer, base: tuple[int, int], keypoints: int = 20, counter: PCKCounter | None = None
) -> PCKCounter:
    """PCK of one variant on the stereo pair: grid keypoints of the left image with a finite disparity."""
    from PIL import Image

    counter = counter or PCKCounter()
    left, right, disparity = load_stereo()
    height, width = disparity.shape
    points = keypoint_grid(keypoints)
    px = np.clip((points[:, 0] * width).astype(int), 0, width - 1)
    py = np.clip((points[:, 1] * height).astype(int), 0, height - 1)
    d = disparity[py, px]
    valid = np.isfinite(d)
    truth = points.copy()
    truth[:, 0] -= np.where(valid, d, 0) / width
    valid &= truth[:, 0] >= 0
    size = timer.variant.input_size(base)
    pictures = [Image.fromarray(left), Image.fromarray(right)]
    pair = torch.stack([image_to_tensor(picture, size) for picture in pictures])
    sources = [image_to_tensor(picture) for picture in pictures] if timer.wants_sources else None
    features = timer(pair, sources).float().cpu()
    matched = match_keypoints(features[0], features[1], points[valid])
    counter.add(pck(matched, truth[valid], base, counter.alphas))
    return counter


def evaluate_variant(
    variant: FeatureVariant,
    images: list[Path],
    base: tuple[int, int],
    *,
    stereo: bool = False,
    seed: int = 0,
    strength: float = 0.15,
    keypoints: int = 20,
    device: torch.device | str = "cpu",
) -> VariantResult:
    """PCK (x100) on the homography pairs of `images` and, with `stereo`, on the stereo pair."""
    timer = FeatureTimer(variant, device)
    size = variant.input_size(base)
    picture = load_image(images[0]) if images else _stereo_left()
    sources = [image_to_tensor(picture)] if timer.wants_sources else None
    timer.warmup(image_to_tensor(picture, size)[None], sources)  # one-off costs stay out of the timing
    metrics: dict[str, float] = {}
    details: dict = {"feature_grid": list(variant.output_grid(base))}
    if images:
        counter = homography_pck(timer, images, base, seed, strength, keypoints)
        metrics.update(counter.percent())
        details["homography_keypoints"] = counter.total
    if stereo:
        counter = stereo_pck(timer, base, keypoints)
        metrics.update(counter.percent("stereo "))
        details["stereo_keypoints"] = counter.total
    return timer.result(metrics, details)


@dataclass(kw_only=True)
class WarpConfig(TaskConfig):
    """Settings of the warp task.

    ``data``: an image folder, glob or file (sorted by path; `featlift.images.collect_images`), or
    ``"stereo"`` for the stereo pair only; ``stereo``: also match across the stereo pair; ``limit``: only
    the first N images; ``seed``: of the random homographies; ``strength``: the largest corner shift, a
    fraction of the size, in [0, 0.5); ``keypoints``: a K x K grid of source keypoints.
    """

    data: str
    stereo: bool = False
    limit: int | None = None
    seed: int = 0
    strength: float = 0.15
    keypoints: int = 20

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_int("limit", 1, optional=True)
        self.check_int("seed", 0)
        self.check_float("strength", 0, 0.5, high_open=True)
        self.check_int("keypoints", 1)

    @property
    def uses_stereo(self) -> bool:
        return self.stereo or self.data == "stereo"

    def check_data(self) -> None:
        self.images()  # a folder, glob or file with no images is refused, naming it

    def images(self) -> list[Path]:
        """The image files of ``data`` (none for ``"stereo"``), the first ``limit``."""
        if self.data == "stereo":
            return []
        return [item.path for item in collect_images([self.data])][: self.limit]


def evaluate_warp(
    config: WarpConfig,
    variants: Sequence[FeatureVariant],
    device: torch.device | str = "cpu",
    weights: str | None = None,
    on_result: Callable[[VariantResult], None] | None = None,
) -> TaskResults:
    """PCK of every variant under `config`'s homographies (and stereo pair); `on_result` sees each row as it
    is done; `weights` (the backbone's weights file) is recorded in the settings."""
    images = config.images()
    check_sizes(variants, config.size)
    rows = evaluate_each(
        variants,
        lambda v: evaluate_variant(
            v,
            images,
            config.size,
            stereo=config.uses_stereo,
            seed=config.seed,
            strength=config.strength,
            keypoints=config.keypoints,
            device=device,
        ),
        on_result,
    )
    settings = eval_settings(
        variants,
        config.size,
        device,
        weights,
        data=str(config.data),
        images=len(images),
        stereo=config.uses_stereo,
        seed=config.seed,
        strength=config.strength,
        keypoints=f"{config.keypoints}x{config.keypoints} grid at cell centres",
        homography="each corner moved by U(-strength, strength) of the size in x and y; rendered per variant "
        "from the image resized (bicubic) to its input size, bilinear sampling, zeros outside",
        matching="bilinear descriptor at the source keypoint, nearest neighbour (cosine) over target cells, "
        "match at the cell centre",
        pck="error <= alpha * max(h, w) of the base size, over keypoints inside the warped image / with a finite disparity",
    )
    return TaskResults("warp", rows, settings, list(rows[0].metrics) if rows else [])
