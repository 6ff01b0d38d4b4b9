"""``featlift eval warp``: keypoint correspondence under known warps, with no annotated dataset.

Two sources of ground truth:

- homographies: each real image is warped by a random homography (its four corners moved independently by up to
  ``strength`` of the image size; seeded per image, so every run and every variant sees the same warps). The warp
  is defined in normalised coordinates, so each variant renders the source and warped image at its own input size
  from the original pixels (``input-2x`` sees real detail);
- a real stereo pair: scikit-image's ``stereo_motorcycle`` (Middlebury 2014) with ground-truth disparity: a
  left-image point ``(x, y)`` is at ``(x - d, y)`` in the right image.

A regular grid of source keypoints is described by the source feature map, sampled bilinearly at each keypoint;
its match is the cell of the target feature map with the highest cosine similarity (nearest neighbour), placed
at that cell's centre. PCK@alpha is the share of keypoints whose match lies within ``alpha * max(h, w)`` pixels
of the true location (h, w: the base size), over keypoints that land inside the target image (homographies) or
have a valid disparity (stereo).
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..commands.numbers import float_in, int_at_least
from ..errors import FeatliftError
from ..images import collect_images, image_to_tensor, load_image
from ..variants import FeatureVariant
from .report import VariantResult, markdown_table, write_results
from .runner import FeatureTimer, add_eval_args, check_sizes, eval_settings, variants_from_args

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


# ------------------------------------------------------------------------------------------- matching


def match_keypoints(source: torch.Tensor, target: torch.Tensor, points: np.ndarray) -> np.ndarray:
    """Nearest-neighbour matches of keypoints between two feature maps ``[C, h, w]`` (any two grid sizes).

    Each normalised source point ``(x, y)`` is described by bilinear sampling of `source`; its match is the
    centre of the `target` cell with the highest cosine similarity. Returns normalised ``[N, 2]``.
    """
    grid = torch.from_numpy(points * 2 - 1).float()[None, None]  # [1, 1, N, 2]
    descriptors = F.grid_sample(source[None].float(), grid, mode="bilinear", align_corners=False)[
        0, :, 0
    ]  # [C, N]
    descriptors = F.normalize(descriptors, dim=0)
    _, th, tw = target.shape
    cells = F.normalize(target.float().reshape(target.shape[0], -1), dim=0)  # [C, th*tw]
    best = (descriptors.T @ cells).argmax(1).numpy()
    return np.stack([(best % tw + 0.5) / tw, (best // tw + 0.5) / th], axis=1)


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
        source = image_to_tensor(load_image(path), size)
        features = timer(torch.stack([source, warp_image(source, matrix)])).float().cpu()
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
    pair = torch.stack(
        [image_to_tensor(Image.fromarray(left), size), image_to_tensor(Image.fromarray(right), size)]
    )
    features = timer(pair).float().cpu()
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
    warm = image_to_tensor(load_image(images[0]), size) if images else image_to_tensor(_stereo_left(), size)
    timer.warmup(warm[None])  # one-off costs stay out of the timing
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


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "warp",
        help="keypoint correspondence under known random homographies and on a real stereo pair (PCK)",
        description="Match a grid of keypoints between each image and a seeded random homography of it (and, with "
        "--stereo, across skimage's Middlebury stereo pair) by nearest neighbours of the features; report PCK@0.1, "
        "0.05, 0.01 of max(h, w). `--data stereo` runs the stereo pair only.",
    )
    parser.add_argument(
        "--data", required=True, help="image folder/glob/file(s), or 'stereo' for the stereo pair only"
    )
    parser.add_argument(
        "--stereo", action="store_true", help="also match across skimage.data.stereo_motorcycle()"
    )
    parser.add_argument(
        "--limit", type=int_at_least(1), default=None, help="use only the first N images (sorted by path)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random homographies (0)")
    parser.add_argument(
        "--strength",
        type=float_in(0, 0.5, high_open=True),
        default=0.15,
        help="max corner shift, a fraction of the size, in [0, 0.5) (0.15)",
    )
    parser.add_argument(
        "--keypoints", type=int_at_least(1), default=20, help="a KxK grid of source keypoints (20)"
    )
    add_eval_args(parser, default_size=(224, 224))
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..devices import resolve_device

    stereo = args.stereo or args.data == "stereo"
    images = (
        [] if args.data == "stereo" else [item.path for item in collect_images([args.data])][: args.limit]
    )
    device = resolve_device(args.device)
    backbone, variants = variants_from_args(args, device)
    check_sizes(variants, args.size)
    rows = []
    for variant in variants:
        row = evaluate_variant(
            variant,
            images,
            args.size,
            stereo=stereo,
            seed=args.seed,
            strength=args.strength,
            keypoints=args.keypoints,
            device=device,
        )
        rows.append(row)
        print(
            f"{variant.label}: " + " ".join(f"{k} {v:.1f}" for k, v in row.metrics.items()),
            f"({row.ms_per_image:.0f} ms/image features)",
            flush=True,
        )
    settings = eval_settings(
        args,
        backbone,
        variants,
        data=str(args.data),
        images=len(images),
        stereo=stereo,
        seed=args.seed,
        strength=args.strength,
        keypoints=f"{args.keypoints}x{args.keypoints} grid at cell centres",
        homography="each corner moved by U(-strength, strength) of the size in x and y; rendered per variant "
        "from the image resized (bicubic) to its input size, bilinear sampling, zeros outside",
        matching="bilinear descriptor at the source keypoint, nearest neighbour (cosine) over target cells, "
        "match at the cell centre",
        pck="error <= alpha * max(h, w) of the base size, over keypoints inside the warped image / with a finite disparity",
    )
    names = list(rows[0].metrics) if rows else []
    if args.out:
        write_results(args.out, "warp", rows, settings, metric_names=names)
        print(f"results -> {args.out}/results.json, results.md")
    print(markdown_table(rows, names))
    return 0
