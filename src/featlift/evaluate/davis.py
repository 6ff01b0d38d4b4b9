"""The ``davis`` task (``featlift eval davis``): semi-supervised video object segmentation by label propagation (DAVIS 2016/2017).

Protocol (DINO's ``eval_video_segmentation.py``, as used by LiFT):

- every frame is resized to the base size (bicubic, aspect ratio ignored) times the variant's input scale;
- the first frame's annotation is resized to the feature grid (nearest) and one-hot encoded;
- each later frame takes its labels from a context of the first frame and the ``n_last`` (7) previous frames
  (their propagated soft labels): cosine affinity between L2-normalised features, restricted to a square
  neighbourhood of ``radius`` cells (12 on the base grid, scaled by the variant's grid density: 24 on a 2x grid),
  the top-k (5) context cells per target cell over all context frames together, weights
  ``softmax(affinity / 0.1)`` over those k;
- the soft label map is upsampled bilinearly to the annotation resolution and argmaxed (optionally after DINO's
  ``norm_mask``, which rescales each label channel to [0, 1] first).

Metrics follow the davis2017-evaluation toolkit: the first and last frames are left out, J (region IoU, void
pixels excluded) and F (boundary F-measure with a tolerance of ``ceil(0.008 * image diagonal)`` pixels, seg2bmap
boundaries and disk dilation) are averaged over frames per object, then over objects; J&F is their mean.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import FeatliftError
from ..variants import FeatureVariant
from .report import TaskResults, VariantResult
from .runner import FeatureTimer, check_sizes, eval_settings, evaluate_each, load_inputs
from .task_config import TaskConfig

logger = logging.getLogger(__name__)

LAYOUT = (
    "ROOT/JPEGImages/480p/<sequence>/<frame>.jpg, ROOT/Annotations/480p/<sequence>/<frame>.png "
    "(one PNG per frame, same stem), optional ROOT/ImageSets/<year>/val.txt"
)
VOID = 255


# --------------------------------------------------------------------------------------------- dataset


@dataclass
class DavisSequence:
    """One video: its frame files and annotation files (same stems, sorted)."""

    name: str
    frames: list[Path]
    annotations: list[Path]


def list_sequences(
    root: str | Path,
    year: int = 2016,
    names: Sequence[str] | None = None,
    resolution: str = "480p",
    max_frames: int | None = None,
) -> list[DavisSequence]:
    """Find the sequences of a DAVIS root and check its layout; raise `FeatliftError` naming what is missing.

    Sequences come from `names`, else ``ImageSets/<year>/val.txt`` when present, else every folder in
    ``JPEGImages/<resolution>``. Every frame must have an annotation PNG with the same stem.
    """
    root = Path(root)
    images_dir = root / "JPEGImages" / resolution
    annotations_dir = root / "Annotations" / resolution
    for folder in (root, images_dir, annotations_dir):
        if not folder.is_dir():
            raise FeatliftError(f"{folder}: no such folder; expected DAVIS layout: {LAYOUT}")
    if names:
        chosen = list(names)
    else:
        listing = root / "ImageSets" / str(year) / "val.txt"
        if listing.is_file():
            chosen = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
        else:
            chosen = sorted(p.name for p in images_dir.iterdir() if p.is_dir())
    if not chosen:
        raise FeatliftError(f"{images_dir}: no sequence folders; expected DAVIS layout: {LAYOUT}")
    sequences = []
    for name in chosen:
        frame_dir, ann_dir = images_dir / name, annotations_dir / name
        for folder in (frame_dir, ann_dir):
            if not folder.is_dir():
                raise FeatliftError(
                    f"{folder}: no such folder (sequence {name!r}); expected DAVIS layout: {LAYOUT}"
                )
        frames = sorted(p for p in frame_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if len(frames) < 2:
            raise FeatliftError(f"{frame_dir}: {len(frames)} frame(s); a sequence needs at least 2")
        if max_frames is not None:
            frames = frames[:max_frames]
        annotations = [ann_dir / f"{p.stem}.png" for p in frames]
        for path in annotations:
            if not path.is_file():
                raise FeatliftError(f"{path}: no such annotation file; expected DAVIS layout: {LAYOUT}")
        sequences.append(DavisSequence(name, frames, annotations))
    return sequences


def read_annotation(path: str | Path, year: int) -> np.ndarray:
    """Annotation PNG -> ``[H, W]`` int64 label map: 0 background, 1..N objects, 255 void (2017 only).

    DAVIS 2016 masks (0/255 greyscale, or a 2017 palette PNG read as 2016) become one object: any non-zero pixel.
    """
    try:
        with Image.open(path) as image:
            array = np.array(image)
    except OSError as exc:
        raise FeatliftError(f"{path}: cannot read annotation PNG ({exc})") from exc
    if array.ndim == 3:
        raise FeatliftError(
            f"{path}: expected a single-channel (greyscale or palette) PNG, got {array.shape[2]} channels"
        )
    array = array.astype(np.int64)
    if year == 2016:
        return (array > 0).astype(np.int64)
    return array


# --------------------------------------------------------------------------------------------- metrics


def region_similarity(gt: np.ndarray, pred: np.ndarray, void: np.ndarray | None = None) -> float:
    """J: IoU of two boolean masks ``[H, W]``, void pixels excluded; 1 when both are empty."""
    gt, pred = gt.astype(bool), pred.astype(bool)
    keep = np.ones_like(gt) if void is None else ~void.astype(bool)
    union = np.sum((gt | pred) & keep)
    if union == 0:
        return 1.0
    return float(np.sum((gt & pred) & keep) / union)


def seg2bmap(seg: np.ndarray) -> np.ndarray:
    """One-pixel-wide boundary map of a boolean mask, as the DAVIS toolkit's ``_seg2bmap`` computes it."""
    seg = seg.astype(bool)
    e = np.zeros_like(seg)
    s = np.zeros_like(seg)
    se = np.zeros_like(seg)
    e[:, :-1] = seg[:, 1:]
    s[:-1, :] = seg[1:, :]
    se[:-1, :-1] = seg[1:, 1:]
    b = seg ^ e | seg ^ s | seg ^ se
    b[-1, :] = seg[-1, :] ^ e[-1, :]
    b[:, -1] = seg[:, -1] ^ s[:, -1]
    b[-1, -1] = False
    return b


def boundary_f_measure(
    gt: np.ndarray, pred: np.ndarray, void: np.ndarray | None = None, bound_th: float = 0.008
) -> float:
    """F: boundary F-measure of two masks; boundaries match within ``ceil(bound_th * diagonal)`` pixels (or
    `bound_th` pixels when >= 1), by dilation with a disk, as davis2017-evaluation's ``f_measure``.

    Dilating with ``skimage.morphology.disk(r)`` marks the pixels within Euclidean distance r of the boundary,
    which is what the distance transform gives directly (the same set, computed without the dilation)."""
    from scipy.ndimage import distance_transform_edt

    gt, pred = gt.astype(bool), pred.astype(bool)
    if void is not None:
        gt, pred = gt & ~void.astype(bool), pred & ~void.astype(bool)
    bound_pix = bound_th if bound_th >= 1 else int(np.ceil(bound_th * np.linalg.norm(gt.shape)))
    fg_boundary, gt_boundary = seg2bmap(pred), seg2bmap(gt)
    n_fg, n_gt = int(fg_boundary.sum()), int(gt_boundary.sum())
    if n_fg == 0 and n_gt == 0:
        return 1.0
    if n_fg == 0 or n_gt == 0:
        return 0.0  # precision or recall is 0
    fg_dil = distance_transform_edt(~fg_boundary) <= bound_pix
    gt_dil = distance_transform_edt(~gt_boundary) <= bound_pix
    precision = float(np.sum(fg_boundary & gt_dil)) / n_fg
    recall = float(np.sum(gt_boundary & fg_dil)) / n_gt
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


# --------------------------------------------------------------------------------------------- propagation


def labels_to_grid(labels: np.ndarray, grid: tuple[int, int], num_labels: int) -> torch.Tensor:
    """``[H, W]`` label map -> one-hot ``[num_labels, h, w]`` on the feature grid (nearest resize, void -> 0)."""
    small = Image.fromarray(labels.astype(np.uint8)).resize((grid[1], grid[0]), Image.NEAREST)
    small = torch.from_numpy(np.array(small).astype(np.int64))
    small[small >= num_labels] = 0
    return F.one_hot(small, num_labels).permute(2, 0, 1).float()


class LabelPropagation:
    """Propagates soft labels from context frames to a target frame through feature affinities.

    Features are ``[C, h, w]``; labels ``[K, h, w]``. The target's labels are the softmax(affinity / temperature)
    weighted mean over its `topk` most similar context cells (cosine), among cells of all context frames within
    `radius` cells (Chebyshev distance; 0 = no restriction). Computed in chunks of target cells, so memory grows
    with ``chunk * context * h * w`` rather than with ``(h * w)**2``.
    """

    def __init__(self, topk: int = 5, temperature: float = 0.1, radius: int = 12, chunk: int = 1024):
        self.topk = topk
        self.temperature = temperature
        self.radius = radius
        self.chunk = chunk

    def __call__(
        self, target: torch.Tensor, context_features: list[torch.Tensor], context_labels: list[torch.Tensor]
    ) -> torch.Tensor:
        c, h, w = target.shape
        n = len(context_features)
        query = F.normalize(target.reshape(c, h * w), dim=0).T  # [hw, C]
        keys = F.normalize(torch.stack(context_features).reshape(n, c, h * w), dim=1)
        keys = keys.permute(1, 0, 2).reshape(c, n * h * w)  # [C, n*hw]
        values = torch.stack(context_labels)  # [n, K, h, w]
        num_labels = values.shape[1]
        values = values.reshape(n, num_labels, h * w).permute(0, 2, 1).reshape(n * h * w, num_labels)
        ys = torch.arange(h).repeat_interleave(w)
        xs = torch.arange(w).repeat(h)
        out = torch.empty(h * w, num_labels)
        k = min(self.topk, n * h * w)
        for start in range(0, h * w, self.chunk):
            stop = min(start + self.chunk, h * w)
            sim = query[start:stop] @ keys  # [q, n*hw]
            if self.radius > 0:
                near = ((ys[start:stop, None] - ys[None]).abs() <= self.radius) & (
                    (xs[start:stop, None] - xs[None]).abs() <= self.radius
                )  # [q, hw]
                sim = sim.reshape(stop - start, n, h * w).masked_fill(~near[:, None], float("-inf"))
                sim = sim.reshape(stop - start, n * h * w)
            top, index = sim.topk(k, dim=1)
            weights = torch.softmax(top / self.temperature, dim=1)  # [q, k]
            out[start:stop] = torch.einsum("qk,qkl->ql", weights, values[index])
        return out.T.reshape(num_labels, h, w)


def norm_mask(probabilities: torch.Tensor) -> torch.Tensor:
    """DINO's ``norm_mask``: rescale each channel of ``[K, H, W]`` to [0, 1] (channels with max 0 untouched)."""
    out = probabilities.clone()
    for channel in out:
        if channel.max() > 0:
            channel.sub_(channel.min())
            channel.div_(channel.max().clamp_min(1e-12))
    return out


def decode(soft: torch.Tensor, size: tuple[int, int], use_norm_mask: bool = False) -> np.ndarray:
    """Soft labels ``[K, h, w]`` -> label map ``[H, W]``: bilinear upsampling to `size`, optional norm_mask, argmax."""
    up = F.interpolate(soft[None], size=size, mode="bilinear", align_corners=False)[0]
    if use_norm_mask:
        up = norm_mask(up)
    return up.argmax(0).numpy()


@dataclass
class SequenceResult:
    name: str
    objects: int
    J: list[float]  # per object, mean over frames
    F: list[float]
    frames: int
    propagation_seconds: float


def _features_of(
    timer: FeatureTimer, frames: list[Path], size: tuple[int, int], batch_size: int
) -> Iterator[torch.Tensor]:
    for start in range(0, len(frames), batch_size):
        batch = (
            timer(*load_inputs(frames[start : start + batch_size], size, timer.wants_sources)).float().cpu()
        )
        yield from batch


def evaluate_sequence(
    sequence: DavisSequence,
    timer: FeatureTimer,
    base: tuple[int, int],
    year: int = 2016,
    n_last: int = 7,
    propagation: LabelPropagation | None = None,
    use_norm_mask: bool = False,
    batch_size: int = 4,
) -> tuple[SequenceResult, list[np.ndarray]]:
    """Propagate the first annotation of `sequence` with one variant; score it; also return the predictions."""
    variant: FeatureVariant = timer.variant
    propagation = propagation or LabelPropagation()
    size = variant.input_size(base)
    first = read_annotation(sequence.annotations[0], year)
    num_labels = int(first[first != VOID].max()) + 1
    if num_labels < 2:
        raise FeatliftError(f"{sequence.annotations[0]}: the first annotation has no object")
    features = _features_of(timer, sequence.frames, size, batch_size)
    first_features = next(features)
    grid = tuple(first_features.shape[-2:])
    first_labels = labels_to_grid(first, grid, num_labels)
    recent: list[tuple[torch.Tensor, torch.Tensor]] = []
    predictions = [first]
    seconds = 0.0
    for feature in features:
        start = time.perf_counter()
        context = [(first_features, first_labels), *recent]
        soft = propagation(feature, [c[0] for c in context], [c[1] for c in context])
        recent = [*recent, (feature, soft)][-n_last:] if n_last > 0 else []
        predictions.append(decode(soft, first.shape, use_norm_mask))
        seconds += time.perf_counter() - start
    J, Fm = _score(sequence, predictions, year, num_labels)
    return SequenceResult(sequence.name, num_labels - 1, J, Fm, len(sequence.frames), seconds), predictions


def _score(
    sequence: DavisSequence, predictions: list[np.ndarray], year: int, num_labels: int
) -> tuple[list[float], list[float]]:
    """Per-object J and F means over frames 1..n-2 (the toolkit leaves out the first and last frame)."""
    indices = range(1, len(predictions) - 1) if len(predictions) > 2 else range(1, len(predictions))
    per_object_j = [[] for _ in range(1, num_labels)]
    per_object_f = [[] for _ in range(1, num_labels)]
    for i in indices:
        gt = read_annotation(sequence.annotations[i], year)
        if gt.shape != predictions[i].shape:
            raise FeatliftError(
                f"{sequence.annotations[i]}: size {gt.shape} differs from the first annotation's"
            )
        void = gt == VOID if year != 2016 else None
        for obj in range(1, num_labels):
            per_object_j[obj - 1].append(region_similarity(gt == obj, predictions[i] == obj, void))
            per_object_f[obj - 1].append(boundary_f_measure(gt == obj, predictions[i] == obj, void))
    return [float(np.mean(v)) for v in per_object_j], [float(np.mean(v)) for v in per_object_f]


def grid_radius(variant: FeatureVariant, base: tuple[int, int], base_radius: int) -> int:
    """The neighbourhood radius on the variant's grid: `base_radius` cells of the base grid, scaled by density."""
    base_grid = variant.pipeline.backbone.grid_size(*base)
    grid = variant.output_grid(base)
    return int(round(base_radius * grid[0] / base_grid[0]))


def evaluate_variant(
    variant: FeatureVariant,
    sequences: list[DavisSequence],
    base: tuple[int, int],
    *,
    year: int = 2016,
    n_last: int = 7,
    topk: int = 5,
    temperature: float = 0.1,
    radius: int = 12,
    use_norm_mask: bool = False,
    device: torch.device | str = "cpu",
    batch_size: int = 4,
    save_dir: Path | None = None,
) -> VariantResult:
    """J, F and J&F (x100) of one variant over `sequences`, with per-sequence details and feature cost."""
    timer = FeatureTimer(variant, device)
    first = load_inputs(sequences[0].frames[:1], variant.input_size(base), timer.wants_sources)
    timer.warmup(*first)  # one-off costs stay out of the timing
    propagation = LabelPropagation(
        topk=topk, temperature=temperature, radius=grid_radius(variant, base, radius)
    )
    per_sequence = {}
    all_j, all_f = [], []
    propagation_seconds = 0.0
    for sequence in sequences:
        result, predictions = evaluate_sequence(
            sequence, timer, base, year, n_last, propagation, use_norm_mask, batch_size
        )
        all_j += result.J
        all_f += result.F
        propagation_seconds += result.propagation_seconds
        j, f = 100 * float(np.mean(result.J)), 100 * float(np.mean(result.F))
        per_sequence[sequence.name] = {"J": j, "F": f, "J&F": (j + f) / 2, "objects": result.objects}
        logger.info("%s %s: J %.1f F %.1f (%d frames)", variant.label, sequence.name, j, f, result.frames)
        if save_dir is not None:
            _save_predictions(save_dir / _safe(variant.label) / sequence.name, sequence, predictions)
    j, f = 100 * float(np.mean(all_j)), 100 * float(np.mean(all_f))
    frames = sum(len(s.frames) for s in sequences)
    details = {
        "per_sequence": per_sequence,
        "feature_grid": list(variant.output_grid(base)),
        "radius": propagation.radius,
        "propagation_ms_per_frame": 1000 * propagation_seconds / max(1, frames - len(sequences)),
    }
    return timer.result({"J&F": (j + f) / 2, "J": j, "F": f}, details)


def _safe(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_=." else "_" for ch in label)


def _save_predictions(folder: Path, sequence: DavisSequence, predictions: list[np.ndarray]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    palette = [0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255, 255, 255, 0, 255, 0, 255, 0, 255, 255] + [128] * (
        3 * 249
    )
    for path, prediction in zip(sequence.annotations, predictions, strict=True):
        image = Image.fromarray(prediction.astype(np.uint8), mode="P")
        image.putpalette(palette)
        image.save(folder / path.name)


def per_sequence_markdown(rows: list[VariantResult]) -> str:
    """A J&F table: one row per sequence, one column per variant."""
    names = list(rows[0].details["per_sequence"]) if rows else []
    header = ["sequence", *(f"`{r.variant}`" for r in rows)]
    lines = [
        "J&F per sequence:",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    for name in names:
        cells = [name, *(f"{r.details['per_sequence'][name]['J&F']:.1f}" for r in rows)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- task


@dataclass(kw_only=True)
class DavisConfig(TaskConfig):
    """Settings of the davis task.

    ``data``: the DAVIS root (`LAYOUT`); ``year``: 2016 (one object) or 2017 (several); ``sequences``: names
    (None: val.txt or all); ``resolution``: the image/annotation subfolder; ``max_frames``: only the first
    N >= 2 frames of each sequence; ``n_last``: previous frames in the context besides the first; ``topk``:
    context cells each target cell takes labels from; ``temperature`` of the affinity softmax; ``radius``:
    the neighbourhood in cells of the base grid, scaled with grid density (0: no limit); ``norm_mask``:
    DINO's decode; ``batch_size``: frames per feature batch; ``masks_dir``: also write the predicted masks
    to ``masks_dir/<variant>/<sequence>/`` (None: not written).
    """

    data: str | Path
    year: int = 2016
    sequences: Sequence[str] | None = None
    resolution: str = "480p"
    max_frames: int | None = None
    n_last: int = 7
    topk: int = 5
    temperature: float = 0.1
    radius: int = 12
    norm_mask: bool = False
    batch_size: int = 4
    masks_dir: str | Path | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_choice("year", (2016, 2017))
        self.check_int("max_frames", 2, optional=True)
        self.check_int("n_last", 0)
        self.check_int("topk", 1)
        self.check_float("temperature", 0, low_open=True)
        self.check_int("radius", 0)
        self.check_choice("norm_mask", (True, False))
        self.check_int("batch_size", 1)


def evaluate_davis(
    config: DavisConfig,
    variants: Sequence[FeatureVariant],
    device: torch.device | str = "cpu",
    weights: str | None = None,
    on_result: Callable[[VariantResult], None] | None = None,
) -> TaskResults:
    """J, F and J&F of every variant on the sequences `config` selects; `on_result` sees each row as it is
    done; `weights` (the backbone's weights file) is recorded in the settings."""
    sequences = list_sequences(
        config.data, config.year, config.sequences, config.resolution, max_frames=config.max_frames
    )
    check_sizes(variants, config.size)
    masks_dir = Path(config.masks_dir) if config.masks_dir is not None else None
    rows = evaluate_each(
        variants,
        lambda v: evaluate_variant(
            v,
            sequences,
            config.size,
            year=config.year,
            n_last=config.n_last,
            topk=config.topk,
            temperature=config.temperature,
            radius=config.radius,
            use_norm_mask=config.norm_mask,
            device=device,
            batch_size=config.batch_size,
            save_dir=masks_dir,
        ),
        on_result,
    )
    settings = eval_settings(
        variants,
        config.size,
        device,
        weights,
        data=str(config.data),
        year=config.year,
        resolution=config.resolution,
        sequences=[s.name for s in sequences],
        frames=sum(len(s.frames) for s in sequences),
        max_frames=config.max_frames,
        input_resize="bicubic to the base size (times the input scale), aspect ratio ignored",
        first_frame_labels="nearest resize to the feature grid, one-hot",
        context=f"first frame + {config.n_last} previous frames (soft labels)",
        topk=config.topk,
        temperature=config.temperature,
        radius_base_grid=config.radius,
        decode="bilinear upsampling to the annotation size, "
        + ("norm_mask, " if config.norm_mask else "")
        + "argmax",
        norm_mask=config.norm_mask,
        metrics="davis2017-evaluation: first and last frames excluded; J, F (bound_th 0.008) averaged per object",
    )
    return TaskResults("davis", rows, settings, ["J&F", "J", "F"], extra_markdown=per_sequence_markdown(rows))
