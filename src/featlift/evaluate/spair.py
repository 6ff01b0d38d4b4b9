"""The ``spair`` task (``featlift eval spair``): semantic keypoint correspondence on SPair-71k, PCK per category.

Layout (the official SPair-71k release)::

    ROOT/JPEGImages/<category>/<image>.jpg
    ROOT/PairAnnotation/{trn,val,test}/<id>-<src>-<trg>:<category>.json
    ROOT/ImageAnnotation/<category>/<image>.json      (not read: the pair files carry all we need)

A pair file holds ``src_imname``, ``trg_imname``, ``category``, ``src_kps`` / ``trg_kps`` (lists of
``[x, y]`` in original pixels, index-matched), ``src_bndbox`` / ``trg_bndbox`` (``[x1, y1, x2, y2]``),
``src_imsize`` / ``trg_imsize`` (``[w, h, 3]``), ``kps_ids`` and difficulty flags.

Protocol: both images are resized to the variant's input size (bicubic, aspect ratio ignored, as
everywhere in featlift); each source keypoint's feature is sampled bilinearly on the source feature
grid; its cosine nearest neighbour on the target grid is mapped back to target pixels (cell centre),
by `featlift.evaluate.correspondence.match_keypoints`;
a match is correct when it lies within ``alpha * max(h, w)`` of the target bounding box, in original
target pixels. PCK is pooled over the keypoints of a category; the headline is the mean over categories.
"""

from __future__ import annotations

import json
import logging
import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import FeatliftError
from ..images import image_to_tensor, load_image
from ..variants import FeatureVariant
from .correspondence import match_keypoints, normalized_to_pixel_indices, pixel_indices_to_normalized
from .report import TaskResults, VariantResult
from .runner import FeatureTimer, check_sizes, eval_settings, evaluate_each, require_path
from .task_config import TaskConfig

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


def transfer_keypoints(
    source_features: torch.Tensor,
    target_features: torch.Tensor,
    keypoints: np.ndarray,
    source_size: tuple[int, int],
    target_size: tuple[int, int],
) -> np.ndarray:
    """`match_keypoints` in SPair's pixel indices: ``[K, 2]`` (x, y) of the source image (original
    `source_size` = (width, height)) -> predicted (x, y) in original target pixels, the centre of the
    best-matching target cell."""
    points = pixel_indices_to_normalized(keypoints, source_size)
    return normalized_to_pixel_indices(match_keypoints(source_features, target_features, points), target_size)


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
            sources = [image_to_tensor(image)] if timer.wants_sources else None
            if not warmed:
                timer.warmup(resized, sources)
                warmed = True
            features = F.normalize(timer(resized, sources)[0].float(), dim=0)
            cache[path] = (features.to("cpu", torch.float16), original)
        hits = {alpha: 0 for alpha in alphas}
        points = 0
        for pair in group:
            src, src_size = cache[pair.source]
            trg, trg_size = cache[pair.target]
            predicted = transfer_keypoints(src, trg, pair.source_keypoints, src_size, trg_size)
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


@dataclass(kw_only=True)
class SpairConfig(TaskConfig):
    """Settings of the spair task: ``data`` the SPair-71k root; ``split`` of the pairs; ``pairs_per_category``
    a seeded sample of N pairs per category (None: all); ``categories`` (None: all); ``seed`` of the sample."""

    data: str | Path
    split: str = "test"
    pairs_per_category: int | None = None
    categories: Sequence[str] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_choice("split", SPLITS)
        self.check_int("pairs_per_category", 1, optional=True)
        self.check_int("seed")


def evaluate_spair(
    config: SpairConfig,
    variants: Sequence[FeatureVariant],
    device: torch.device | str = "cpu",
    weights: str | None = None,
    on_result: Callable[[VariantResult], None] | None = None,
) -> TaskResults:
    """PCK of every variant on the pairs `config` selects; `on_result` sees each row as it is done;
    `weights` (the backbone's weights file) is recorded in the settings."""
    pairs = load_spair_pairs(
        config.data, config.split, config.pairs_per_category, config.categories, config.seed
    )
    check_sizes(variants, config.size)
    logger.info(
        "SPair %s: %d pairs in %d categories", config.split, len(pairs), len({p.category for p in pairs})
    )
    rows = evaluate_each(variants, lambda v: evaluate_variant(v, pairs, config.size, device), on_result)
    settings = eval_settings(
        variants,
        config.size,
        device,
        weights,
        data=str(config.data),
        split=config.split,
        pairs=len(pairs),
        pairs_per_category=config.pairs_per_category,
        seed=config.seed,
        resize="bicubic to the variant's input size, aspect ratio ignored",
        threshold="alpha * max(h, w) of the target box, original target pixels",
        pck_pooling="keypoints pooled per category; headline = mean over categories",
    )
    metric_names = [_metric(a) for a in ALPHAS]
    return TaskResults("spair", rows, settings, metric_names, extra_markdown=category_table(rows))
