"""The ``discovery`` task (``featlift eval discovery``): unsupervised single-object discovery with TokenCut, CorLoc on VOC07/VOC12/COCO20k.

TokenCut (Wang et al., CVPR 2022; github.com/YangtaoWANG95/TokenCut ``object_discovery.py``), applied to
any feature map:

1. nodes = feature cells; ``W_ij = 1`` if the cosine similarity is ``> tau`` (0.2), else ``eps`` (1e-5);
2. solve ``(D - W) x = lambda D x`` and take the second-smallest eigenvector;
3. bipartition by its mean; the foreground is the side holding the seed, the cell with the largest ``|x|``;
4. the predicted box is the bounding box of the seed's 4-connected component, scaled to image pixels.

CorLoc: the share of images whose box has IoU >= 0.5 with at least one ground-truth box (TokenCut's
default: every object, difficult and truncated ones included; COCO crowd boxes dropped).

Layouts::

    voc07 / voc12:  ROOT/JPEGImages/<id>.jpg, ROOT/Annotations/<id>.xml, ROOT/ImageSets/Main/<split>.txt
                    (ROOT is VOCdevkit/VOC2007 or VOCdevkit/VOC2012; a ROOT holding VOCdevkit/VOC20xx also works)
    coco20k:        ROOT/images/<file_name> (or ROOT/images/train2014/<file_name>), a COCO instances JSON
                    (--annotations, default ROOT/annotations/instances_train2014_sel20k.json, else
                    ROOT/annotations/instances_train2014.json) and, if present, ROOT/coco_20k_filenames.txt
                    restricting the images to TokenCut's 19,817-image list.

Images are resized to the variant's input size (bicubic, aspect ratio ignored); boxes are scaled back to
original pixels. Upsampled variants make the graph 4x (2x) or 16x (4x) larger: up to ``DENSE_LIMIT`` nodes
the dense generalised solver runs (as in TokenCut); beyond, the same eigenvector comes from Lanczos
(``scipy.sparse.linalg.eigsh``) on ``D^-1/2 W D^-1/2``; beyond ``--max-nodes`` the run is refused.
"""

from __future__ import annotations

import json
import logging
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import FeatliftError
from ..images import image_to_tensor, load_image
from ..variants import FeatureVariant
from .report import TaskResults, VariantResult
from .runner import FeatureTimer, check_sizes, eval_settings, evaluate_each, require_path, wants_sources
from .task_config import TaskConfig

logger = logging.getLogger(__name__)

FORMATS = ("voc07", "voc12", "coco20k")
DEFAULT_TAU = 0.2
DEFAULT_EPS = 1e-5
DENSE_LIMIT = 512
MAX_NODES = 8192
VOC_LAYOUT = (
    "ROOT/JPEGImages/<id>.jpg, ROOT/Annotations/<id>.xml, ROOT/ImageSets/Main/<split>.txt (VOCdevkit/VOC20xx)"
)
COCO_LAYOUT = (
    "ROOT/images/<file_name> (or ROOT/images/train2014/), ROOT/annotations/instances_train2014_sel20k.json "
    "(or instances_train2014.json, or --annotations FILE; COCO instances format), optional ROOT/coco_20k_filenames.txt"
)


@dataclass(frozen=True)
class DiscoveryItem:
    """An image and its ground-truth boxes ``[N, 4]`` as (x1, y1, x2, y2) in continuous pixel coordinates."""

    path: Path
    boxes: np.ndarray


# ---------------------------------------------------------------------------------------------- datasets


def _voc_root(root: Path, year: str | None = None) -> Path:
    """`root` itself, or ROOT/VOCdevkit/VOC<year> (or the only VOCdevkit/VOC20xx) when ROOT is one level up."""
    if (root / "JPEGImages").is_dir() or not (root / "VOCdevkit").is_dir():
        return root
    if year and (root / "VOCdevkit" / f"VOC{year}").is_dir():
        return root / "VOCdevkit" / f"VOC{year}"
    found = sorted(p for p in (root / "VOCdevkit").glob("VOC20*") if p.is_dir())
    return found[0] if len(found) == 1 else root


def read_voc_boxes(path: Path) -> np.ndarray:
    """All object boxes of a VOC XML file as (x1, y1, x2, y2), with TokenCut's ``xmin - 1, ymin - 1`` shift."""
    try:
        tree = ET.parse(path)
    except FileNotFoundError:
        raise FeatliftError(f"{path}: no such file; expected layout: {VOC_LAYOUT}") from None
    except (ET.ParseError, OSError) as exc:
        raise FeatliftError(f"{path}: not a readable VOC annotation XML ({exc})") from exc
    boxes = []
    for obj in tree.getroot().iter("object"):
        box = obj.find("bndbox")
        try:
            x1, y1, x2, y2 = (float(box.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax"))  # type: ignore[union-attr]
        except (AttributeError, TypeError, ValueError):
            raise FeatliftError(
                f"{path}: an <object> lacks <bndbox> with numeric xmin/ymin/xmax/ymax"
            ) from None
        # VOC boxes are 1-based inclusive pixel indices: (1, W) covers the image, i.e. (0, W) continuous
        boxes.append([x1 - 1, y1 - 1, x2, y2])
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4)


def load_voc(
    root: str | Path, split: str = "trainval", limit: int | None = None, year: str | None = None
) -> list[DiscoveryItem]:
    """VOC images of ImageSets/Main/<split>.txt with all their object boxes (`year` picks VOCdevkit/VOC<year>)."""
    root = _voc_root(Path(root), year)
    require_path(root, VOC_LAYOUT, kind="folder")
    listing = root / "ImageSets" / "Main" / f"{split}.txt"
    require_path(listing, VOC_LAYOUT)
    ids = [line.split()[0] for line in listing.read_text().splitlines() if line.strip()]
    if limit is not None:
        ids = ids[:limit]
    items = []
    for image_id in ids:
        image = root / "JPEGImages" / f"{image_id}.jpg"
        require_path(image, VOC_LAYOUT)
        items.append(DiscoveryItem(image, read_voc_boxes(root / "Annotations" / f"{image_id}.xml")))
    return items


def load_coco(
    root: str | Path, annotations: str | Path | None = None, limit: int | None = None
) -> list[DiscoveryItem]:
    """COCO instances JSON -> items with non-crowd boxes (xywh -> x1y1x2y2); images without one are skipped."""
    root = Path(root)
    require_path(root, COCO_LAYOUT, kind="folder")
    if annotations is None:
        candidates = [
            root / "annotations" / "instances_train2014_sel20k.json",
            root / "annotations" / "instances_train2014.json",
        ]
        annotations = next((c for c in candidates if c.is_file()), candidates[0])
    annotations = Path(annotations)
    require_path(annotations, COCO_LAYOUT)
    try:
        data = json.loads(annotations.read_text())
        images = {int(im["id"]): str(im["file_name"]) for im in data["images"]}
        anns = data["annotations"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise FeatliftError(
            f"{annotations}: not a COCO instances JSON with images[{{id, file_name}}] and annotations ({exc})"
        ) from exc
    boxes: dict[int, list[list[float]]] = {}
    for ann in anns:
        if ann.get("iscrowd", 0) == 1:
            continue
        x, y, w, h = (float(v) for v in ann["bbox"])
        boxes.setdefault(int(ann["image_id"]), []).append([x, y, x + w, y + h])
    selection = root / "coco_20k_filenames.txt"
    names = sorted(images.values())
    if selection.is_file():
        wanted = {Path(line.strip()).name for line in selection.read_text().splitlines() if line.strip()}
        names = [n for n in names if Path(n).name in wanted]
    folder = root / "images"
    if not any((folder / n).is_file() for n in names[:1]) and (folder / "train2014").is_dir():
        folder = folder / "train2014"
    by_name = {name: image_id for image_id, name in images.items()}
    skipped = sum(1 for n in names if by_name[n] not in boxes)
    names = [n for n in names if by_name[n] in boxes]
    if skipped:
        logger.info("coco: %d images without a non-crowd box skipped", skipped)
    if limit is not None:
        names = names[:limit]
    items = []
    for name in names:
        require_path(folder / name, COCO_LAYOUT)
        items.append(DiscoveryItem(folder / name, np.asarray(boxes[by_name[name]], dtype=np.float64)))
    return items


def load_discovery_dataset(
    root: str | Path,
    fmt: str,
    split: str | None = None,
    annotations: str | Path | None = None,
    limit: int | None = None,
) -> list[DiscoveryItem]:
    if fmt in ("voc07", "voc12"):
        return load_voc(root, split or "trainval", limit, year="2007" if fmt == "voc07" else "2012")
    if fmt == "coco20k":
        return load_coco(root, annotations, limit)
    raise FeatliftError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")


# ---------------------------------------------------------------------------------------------- TokenCut


@dataclass
class NCutResult:
    """TokenCut's outputs on a ``h x w`` grid: the seed's component, the bipartition, the eigenvector."""

    box: tuple[int, int, int, int]  # (x1, y1, x2, y2) in grid cells, x2/y2 exclusive
    mask: np.ndarray  # [h, w] bool: the seed's connected component
    bipartition: np.ndarray  # [h, w] bool: the foreground side
    seed: tuple[int, int]  # (row, col)
    eigenvector: np.ndarray  # [h, w], sign flipped so the foreground is positive-side


def second_eigenvector(affinity: np.ndarray, dense_limit: int = DENSE_LIMIT) -> np.ndarray:
    """The second-smallest generalised eigenvector of ``(D - W) x = lambda D x`` for a symmetric ``W``.

    Dense ``scipy.linalg.eigh`` up to `dense_limit` nodes; above, Lanczos on the equivalent normalised
    problem ``D^-1/2 W D^-1/2 y = (1 - lambda) y`` with ``x = D^-1/2 y`` (same vector up to scale).
    """
    n = affinity.shape[0]
    degree = affinity.sum(axis=1, dtype=np.float64)
    if n <= dense_limit:
        from scipy.linalg import eigh

        w = affinity.astype(np.float64)
        _, vectors = eigh(np.diag(degree) - w, np.diag(degree), subset_by_index=[1, 2])
        return vectors[:, 0]
    from scipy.sparse.linalg import eigsh

    inv_sqrt = (1.0 / np.sqrt(degree)).astype(np.float32)
    normalized = affinity * inv_sqrt[:, None]
    normalized *= inv_sqrt[None, :]
    start = np.random.default_rng(0).standard_normal(n)
    values, vectors = eigsh(normalized, k=2, which="LA", v0=start, tol=1e-8)
    second = vectors[:, int(np.argsort(values)[0])].astype(np.float64)
    return second * inv_sqrt.astype(np.float64)


def check_graph_size(grid: tuple[int, int], max_nodes: int = MAX_NODES, label: str = "") -> None:
    """Raise `FeatliftError` when a ``grid`` = (h, w) feature map makes a graph of more than `max_nodes` nodes."""
    n = grid[0] * grid[1]
    if n > max_nodes:
        who = f"variant {label}: " if label else ""
        raise FeatliftError(
            f"{who}a {grid[0]}x{grid[1]} feature map gives a {n}-node graph, more than --max-nodes {max_nodes} "
            f"(dense affinity of {n * n * 4 / 2**30:.1f} GiB); use a smaller --size or fewer upsampling passes, "
            "or raise --max-nodes"
        )


def ncut(
    features: torch.Tensor,
    tau: float = DEFAULT_TAU,
    eps: float = DEFAULT_EPS,
    max_nodes: int = MAX_NODES,
    dense_limit: int = DENSE_LIMIT,
) -> NCutResult:
    """TokenCut on a ``[C, h, w]`` feature map: the seed object's box in grid cells.

    Raises `FeatliftError` when ``h * w > max_nodes`` (the affinity matrix is dense, ``(h w)^2`` floats).
    """
    from scipy import ndimage

    channels, height, width = features.shape
    n = height * width
    check_graph_size((height, width), max_nodes)
    flat = F.normalize(features.detach().float().reshape(channels, n), dim=0).cpu()
    affinity = (flat.T @ flat).numpy()
    affinity = np.where(affinity > tau, np.float32(1.0), np.float32(eps)).astype(np.float32)
    vector = second_eigenvector(affinity, dense_limit)
    bipartition = vector > vector.mean()
    seed = int(np.argmax(np.abs(vector)))
    if not bipartition[seed]:
        vector = -vector
        bipartition = ~bipartition
    bipartition = bipartition.reshape(height, width)
    labels, _ = ndimage.label(bipartition)
    row, col = divmod(seed, width)
    mask = labels == labels[row, col]
    rows, cols = np.nonzero(mask)
    box = (int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1)
    return NCutResult(box, mask, bipartition, (row, col), vector.reshape(height, width))


def grid_box_to_pixels(box: Sequence[int], grid: tuple[int, int], image_size: tuple[int, int]) -> np.ndarray:
    """(x1, y1, x2, y2) in cells of a ``grid`` = (h, w) covering an image of `image_size` = (W, H) -> pixels."""
    sx, sy = image_size[0] / grid[1], image_size[1] / grid[0]
    x1, y1, x2, y2 = box
    return np.array(
        [x1 * sx, y1 * sy, min(x2 * sx, image_size[0]), min(y2 * sy, image_size[1])], dtype=np.float64
    )


def box_iou(box: Sequence[float], boxes: np.ndarray) -> np.ndarray:
    """IoU of one (x1, y1, x2, y2) box with each row of ``boxes`` ``[N, 4]`` (continuous coordinates)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2])
    y2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = area + areas - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def is_correct_localization(box: Sequence[float], truth: np.ndarray, threshold: float = 0.5) -> bool:
    """CorLoc hit: IoU >= `threshold` with any ground-truth box."""
    return bool(len(truth) and (box_iou(box, truth) >= threshold).any())


def discover(
    variant: FeatureVariant,
    image_path: str | Path,
    base: tuple[int, int],
    device: torch.device | str = "cpu",
    tau: float = DEFAULT_TAU,
    eps: float = DEFAULT_EPS,
    max_nodes: int = MAX_NODES,
) -> np.ndarray:
    """The TokenCut box (x1, y1, x2, y2) in original pixels for one image, with `variant`'s features."""
    image = load_image(image_path)
    resized = image_to_tensor(image, variant.input_size(base))[None].to(device)
    if wants_sources(variant):
        features = variant(resized, [image_to_tensor(image).to(device)])[0]
    else:
        features = variant(resized)[0]
    result = ncut(features, tau, eps, max_nodes)
    return grid_box_to_pixels(result.box, features.shape[1:], (image.width, image.height))


def evaluate_variant(
    variant: FeatureVariant,
    items: Sequence[DiscoveryItem],
    base: tuple[int, int],
    device: torch.device | str = "cpu",
    tau: float = DEFAULT_TAU,
    eps: float = DEFAULT_EPS,
    max_nodes: int = MAX_NODES,
) -> VariantResult:
    """CorLoc (x100) of one variant; the ncut time per image goes in ``details`` (not in ms / image)."""
    grid = variant.output_grid(base)
    check_graph_size(grid, max_nodes, variant.label)
    timer = FeatureTimer(variant, device)
    size = variant.input_size(base)
    hits = 0
    ncut_seconds = 0.0
    boxes = {}
    for index, item in enumerate(items):
        image = load_image(item.path)
        tensor = image_to_tensor(image, size)[None]
        sources = [image_to_tensor(image)] if timer.wants_sources else None
        if index == 0:
            timer.warmup(tensor, sources)
        features = timer(tensor, sources)[0]
        start = time.perf_counter()
        result = ncut(features, tau, eps, max_nodes)
        ncut_seconds += time.perf_counter() - start
        box = grid_box_to_pixels(result.box, features.shape[1:], (image.width, image.height))
        hit = is_correct_localization(box, item.boxes)
        hits += hit
        boxes[item.path.name] = [round(float(v), 1) for v in box]
    count = max(len(items), 1)
    logger.info("%s: CorLoc %.1f over %d images", variant.label, 100.0 * hits / count, len(items))
    return timer.result(
        {"CorLoc": 100.0 * hits / count},
        {
            "images": len(items),
            "hits": hits,
            "graph_nodes": grid[0] * grid[1],
            "ncut_ms_per_image": 1000.0 * ncut_seconds / count,
            "boxes": boxes,
        },
    )


@dataclass(kw_only=True)
class DiscoveryConfig(TaskConfig):
    """Settings of the discovery task: ``data`` the dataset root in layout ``format`` (one of `FORMATS`);
    ``split`` the VOC image set in ImageSets/Main; ``annotations`` the COCO instances JSON (coco20k; default
    under ROOT/annotations); ``limit`` only the first N images; ``tau`` the cosine threshold of an edge, in
    [-1, 1); ``eps`` the weight of non-edges, in (0, 1); ``max_nodes``: feature grids with more cells are
    refused."""

    data: str | Path
    format: str
    split: str = "trainval"
    annotations: str | Path | None = None
    limit: int | None = None
    tau: float = DEFAULT_TAU
    eps: float = DEFAULT_EPS
    max_nodes: int = MAX_NODES

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_choice("format", FORMATS)
        self.check_int("limit", 1, optional=True)
        self.check_float("tau", -1, 1, high_open=True)
        self.check_float("eps", 0, 1, low_open=True, high_open=True)
        self.check_int("max_nodes", 1)


def evaluate_discovery(
    config: DiscoveryConfig,
    variants: Sequence[FeatureVariant],
    device: torch.device | str = "cpu",
    weights: str | None = None,
    on_result: Callable[[VariantResult], None] | None = None,
) -> TaskResults:
    """CorLoc of every variant on the images `config` selects; `on_result` sees each row as it is done;
    `weights` (the backbone's weights file) is recorded in the settings."""
    items = load_discovery_dataset(config.data, config.format, config.split, config.annotations, config.limit)
    if not items:
        raise FeatliftError(f"{config.data}: no images to evaluate")
    check_sizes(variants, config.size)
    for variant in variants:
        check_graph_size(variant.output_grid(config.size), config.max_nodes, variant.label)
    logger.info("%s: %d images", config.format, len(items))
    rows = evaluate_each(
        variants,
        lambda v: evaluate_variant(v, items, config.size, device, config.tau, config.eps, config.max_nodes),
        on_result,
    )
    settings = eval_settings(
        variants,
        config.size,
        device,
        weights,
        data=str(config.data),
        format=config.format,
        split=config.split if config.format != "coco20k" else None,
        images=len(items),
        tau=config.tau,
        eps=config.eps,
        resize="bicubic to the variant's input size, aspect ratio ignored; boxes scaled back to original pixels",
        ground_truth="all objects (difficult/truncated included), COCO crowd boxes dropped",
        solver=f"scipy.linalg.eigh up to {DENSE_LIMIT} nodes, scipy.sparse.linalg.eigsh above",
    )
    return TaskResults(f"discovery ({config.format})", rows, settings, ["CorLoc"])
