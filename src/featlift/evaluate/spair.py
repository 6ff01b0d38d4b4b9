"""``featlift eval spair``: semantic keypoint correspondence on SPair-71k, PCK per category.

Layout (the official SPair-71k release)::

    ROOT/JPEGImages/<category>/<image>.jpg
    ROOT/PairAnnotation/{trn,val,test}/<id>-<src>-<trg>:<category>.json
    ROOT/ImageAnnotation/<category>/<image>.json      (not read: the pair files carry all we need)

A pair file holds ``src_imname``, ``trg_imname``, ``category``, ``src_kps`` / ``trg_kps`` (lists of
``[x, y]`` in original pixels, index-matched), ``src_bndbox`` / ``trg_bndbox`` (``[x1, y1, x2, y2]``),
``src_imsize`` / ``trg_imsize`` (``[w, h, 3]``), ``kps_ids`` and difficulty flags.

Protocol: both images are resized to the variant's input size (bicubic, aspect ratio ignored, as
everywhere in featlift); each source keypoint's feature is sampled bilinearly on the source feature
grid; its cosine nearest neighbour on the target grid is mapped back to target pixels (cell centre);
a match is correct when it lies within ``alpha * max(h, w)`` of the target bounding box, in original
target pixels. PCK is pooled over the keypoints of a category; the headline is the mean over categories.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..commands.common import positive_int
from ..errors import FeatliftError
from ..images import image_to_tensor, load_image
from ..variants import FeatureVariant
from .report import VariantResult, markdown_table, write_results
from .runner import (
    FeatureTimer,
    add_eval_args,
    check_sizes,
    eval_settings,
    require_path,
    variants_from_args,
)

logger = logging.getLogger(__name__)

SPLITS = ("trn", "val", "test")
ALPHAS = (0.1, 0.05, 0.01)
LAYOUT = (
    "ROOT/JPEGImages/<category>/<image>.jpg, ROOT/PairAnnotation/{trn,val,test}/<id>-<src>-<trg>:<category>.json "
    "(the SPair-71k release)"
)
PAIR_KEYS = ("src_imname", "trg_imname", "category", "src_kps", "trg_kps", "trg_bndbox")


@dataclass(frozen=True)
class SPairPair:
    """One annotated image pair; keypoints ``[K, 2]`` as (x, y) in original pixels, box ``(x1, y1, x2, y2)``."""

    name: str
    category: str
    source: Path
    target: Path
    source_keypoints: np.ndarray
    target_keypoints: np.ndarray
    target_box: tuple[float, float, float, float]


def _read_pair(path: Path, root: Path) -> SPairPair:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FeatliftError(f"{path}: not a readable SPair pair JSON ({exc})") from exc
    missing = [key for key in PAIR_KEYS if not isinstance(data, dict) or key not in data]
    if missing:
        raise FeatliftError(
            f"{path}: missing key(s) {', '.join(missing)}; an SPair pair JSON has {', '.join(PAIR_KEYS)}"
        )
    try:
        src = np.asarray(data["src_kps"], dtype=np.float64).reshape(-1, 2)
        trg = np.asarray(data["trg_kps"], dtype=np.float64).reshape(-1, 2)
        box = tuple(float(v) for v in data["trg_bndbox"])
    except (TypeError, ValueError) as exc:
        raise FeatliftError(
            f"{path}: src_kps/trg_kps must be lists of [x, y] and trg_bndbox [x1, y1, x2, y2] ({exc})"
        ) from exc
    if len(src) != len(trg) or len(box) != 4:
        raise FeatliftError(
            f"{path}: {len(src)} source vs {len(trg)} target keypoints, trg_bndbox of {len(box)} values; "
            "expected index-matched keypoints and [x1, y1, x2, y2]"
        )
    category = str(data["category"])
    return SPairPair(
        name=path.stem,
        category=category,
        source=root / "JPEGImages" / category / str(data["src_imname"]),
        target=root / "JPEGImages" / category / str(data["trg_imname"]),
        source_keypoints=src,
        target_keypoints=trg,
        target_box=box,  # type: ignore[arg-type]
    )


def load_spair_pairs(
    root: str | Path,
    split: str = "test",
    pairs_per_category: int | None = None,
    categories: Sequence[str] | None = None,
    seed: int = 0,
) -> list[SPairPair]:
    """Read the pairs of `split`, optionally `pairs_per_category` of each (a sample of the sorted files seeded
    by `seed` and the category name, so it does not depend on `categories`).

    Raises `FeatliftError` naming the missing folder/file and the expected layout.
    """
    root = Path(root)
    if split not in SPLITS:
        raise FeatliftError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    require_path(root, LAYOUT, kind="folder")
    require_path(root / "JPEGImages", LAYOUT, kind="folder")
    require_path(root / "PairAnnotation" / split, LAYOUT, kind="folder")
    files = sorted((root / "PairAnnotation" / split).glob("*.json"))
    if not files:
        raise FeatliftError(
            f"{root / 'PairAnnotation' / split}: no pair .json files; expected layout: {LAYOUT}"
        )
    by_category: dict[str, list[Path]] = defaultdict(list)
    for path in files:
        # the category is the part after ':' in the official names; fall back to reading the file
        category = path.stem.rsplit(":", 1)[1] if ":" in path.stem else _read_pair(path, root).category
        by_category[category].append(path)
    if categories:
        unknown = sorted(set(categories) - set(by_category))
        if unknown:
            raise FeatliftError(
                f"categories {', '.join(unknown)} have no pairs in {split}; known: {', '.join(sorted(by_category))}"
            )
    pairs: list[SPairPair] = []
    for category in sorted(by_category):
        if categories and category not in categories:
            continue
        chosen = by_category[category]
        if pairs_per_category is not None and pairs_per_category < len(chosen):
            # one generator per category, seeded by (seed, category): a category's sample is the same
            # whichever other categories are evaluated with it
            rng = random.Random(f"{seed}:{category}")
            chosen = sorted(rng.sample(chosen, pairs_per_category))
        for path in chosen:
            pair = _read_pair(path, root)
            for image in (pair.source, pair.target):
                require_path(image, LAYOUT)
            pairs.append(pair)
    return pairs


def match_keypoints(
    source_features: torch.Tensor,
    target_features: torch.Tensor,
    keypoints: np.ndarray | torch.Tensor,
    source_size: tuple[int, int],
    target_size: tuple[int, int],
) -> np.ndarray:
    """Cosine nearest-neighbour transfer of keypoints from a source to a target image.

    Args:
        source_features: ``[C, h, w]`` features of the source image (any grid size).
        target_features: ``[C, h', w']`` features of the target image.
        keypoints: ``[K, 2]`` (x, y) pixel coordinates in the original source image.
        source_size, target_size: original image sizes as (width, height).
    Returns:
        ``[K, 2]`` predicted (x, y) in original target pixels: the centre of the best-matching target cell.

    Grids are taken to cover their image exactly, so pixel ``x`` (centre ``x + 0.5``) sits at grid
    coordinate ``(x + 0.5) / W * w - 0.5``, whatever the resize in between.
    """
    kps = torch.as_tensor(np.asarray(keypoints, dtype=np.float32)).reshape(-1, 2)
    size = torch.tensor(source_size, dtype=torch.float32)
    grid = ((kps + 0.5) / size * 2 - 1).view(1, 1, -1, 2)
    src = source_features.float().unsqueeze(0)
    queries = F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=False)[0, :, 0].T
    queries = F.normalize(queries, dim=1)
    channels, height, width = target_features.shape
    targets = F.normalize(target_features.float().reshape(channels, -1), dim=0)
    best = (queries @ targets).argmax(dim=1)
    rows, cols = best // width, best % width
    x = (cols.double() + 0.5) * target_size[0] / width - 0.5
    y = (rows.double() + 0.5) * target_size[1] / height - 0.5
    return torch.stack([x, y], dim=1).numpy()


def pck_correct(
    predicted: np.ndarray, truth: np.ndarray, box: Sequence[float], alphas: Sequence[float] = ALPHAS
) -> dict[float, np.ndarray]:
    """Per keypoint, whether ``|pred - truth| <= alpha * max(box h, box w)``, for each alpha."""
    x1, y1, x2, y2 = box
    scale = max(x2 - x1, y2 - y1)
    distance = np.linalg.norm(
        np.asarray(predicted, dtype=np.float64) - np.asarray(truth, dtype=np.float64), axis=1
    )
    return {alpha: distance <= alpha * scale for alpha in alphas}


def _metric(alpha: float) -> str:
    return f"PCK@{alpha:g}"


def evaluate_variant(
    variant: FeatureVariant,
    pairs: Sequence[SPairPair],
    base: tuple[int, int],
    device: torch.device | str = "cpu",
    alphas: Sequence[float] = ALPHAS,
) -> VariantResult:
    """PCK of one variant over `pairs` (x100): mean over categories, and per category in ``details``.

    Features of each image are computed once per category (L2-normalised, kept in float16 on the CPU),
    so the timing counts each distinct image once.
    """
    timer = FeatureTimer(variant, device)
    size = variant.input_size(base)
    by_category: dict[str, list[SPairPair]] = defaultdict(list)
    for pair in pairs:
        by_category[pair.category].append(pair)
    per_category: dict[str, dict[str, float]] = {}
    warmed = False
    for category, group in sorted(by_category.items()):
        cache: dict[Path, tuple[torch.Tensor, tuple[int, int]]] = {}
        for path in sorted({p for pair in group for p in (pair.source, pair.target)}):
            image = load_image(path)
            original = (image.width, image.height)
            resized = image_to_tensor(image, size)[None]
            if not warmed:
                timer.warmup(resized)
                warmed = True
            features = F.normalize(timer(resized)[0].float(), dim=0)
            cache[path] = (features.to("cpu", torch.float16), original)
        hits = {alpha: 0 for alpha in alphas}
        points = 0
        for pair in group:
            src, src_size = cache[pair.source]
            trg, trg_size = cache[pair.target]
            predicted = match_keypoints(src, trg, pair.source_keypoints, src_size, trg_size)
            for alpha, ok in pck_correct(predicted, pair.target_keypoints, pair.target_box, alphas).items():
                hits[alpha] += int(ok.sum())
            points += len(pair.source_keypoints)
        per_category[category] = {
            **{_metric(a): 100.0 * hits[a] / max(points, 1) for a in alphas},
            "pairs": len(group),
            "keypoints": points,
        }
        logger.info(
            "%s %s: PCK@%g %.1f over %d pairs",
            variant.label,
            category,
            alphas[0],
            per_category[category][_metric(alphas[0])],
            len(group),
        )
    metrics = {_metric(a): float(np.mean([c[_metric(a)] for c in per_category.values()])) for a in alphas}
    return timer.result(metrics, {"per_category": per_category})


def category_table(rows: Sequence[VariantResult], alpha: float = ALPHAS[0]) -> str:
    """Markdown: one row per category, one column per variant, PCK at `alpha`."""
    metric = _metric(alpha)
    categories = sorted({c for row in rows for c in row.details.get("per_category", {})})
    lines = [
        f"{metric} per category:",
        "",
        "| category | " + " | ".join(f"`{r.variant}`" for r in rows) + " |",
    ]
    lines.append("|" + "---|" * (len(rows) + 1))
    for category in categories:
        cells = [f"{row.details['per_category'][category][metric]:.1f}" for row in rows]
        lines.append(f"| {category} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "spair",
        help="keypoint correspondence on SPair-71k (PCK@0.1/0.05/0.01 of the target box)",
        description="Transfer each source keypoint to the target image by cosine nearest neighbour of the "
        "features and report PCK (threshold alpha * max side of the target box, in original pixels), "
        "per category and averaged over categories, for every --variant. Images are resized to the "
        "variant's input size, ignoring aspect ratio.",
    )
    parser.add_argument(
        "--data", required=True, metavar="ROOT", help="SPair-71k root (JPEGImages/, PairAnnotation/)"
    )
    parser.add_argument("--split", choices=SPLITS, default="test", help="pair split (default test)")
    parser.add_argument(
        "--pairs-per-category",
        type=positive_int,
        default=None,
        metavar="N",
        help="a seeded sample of N pairs per category (default all)",
    )
    parser.add_argument("--categories", default=None, help="comma-separated categories (default all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the pair sample (default 0)")
    add_eval_args(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..devices import resolve_device

    categories = [c for c in args.categories.split(",") if c] if args.categories else None
    pairs = load_spair_pairs(args.data, args.split, args.pairs_per_category, categories, args.seed)
    device = resolve_device(args.device)
    backbone, variants = variants_from_args(args, device)
    check_sizes(variants, args.size)
    logger.info(
        "SPair %s: %d pairs in %d categories", args.split, len(pairs), len({p.category for p in pairs})
    )
    rows = [evaluate_variant(variant, pairs, args.size, device) for variant in variants]
    metric_names = [_metric(a) for a in ALPHAS]
    per_category = category_table(rows)
    if args.out:
        settings = eval_settings(
            args,
            backbone,
            variants,
            data=str(args.data),
            split=args.split,
            pairs=len(pairs),
            pairs_per_category=args.pairs_per_category,
            seed=args.seed,
            resize="bicubic to the variant's input size, aspect ratio ignored",
            threshold="alpha * max(h, w) of the target box, original target pixels",
            pck_pooling="keypoints pooled per category; headline = mean over categories",
        )
        write_results(args.out, "spair", rows, settings, metric_names, extra_markdown=per_category)
    print(markdown_table(rows, metric_names))
    return 0
