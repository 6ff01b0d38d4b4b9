"""The ``probe`` task (``featlift eval probe``): linear-probe semantic segmentation on frozen (upsampled) features, mIoU.

Recipe (the same for every variant, recorded in results.json):

- images resized to the base size times the variant's input scale (bicubic, aspect ratio ignored); labels kept
  at their own resolution;
- features of the train and val images computed once per variant and cached (float16), then standardised per
  channel with the train-set mean and std;
- a linear layer (a 1x1 conv, ``C -> classes``) trained with AdamW (lr 1e-2, weight decay 1e-4, cosine schedule,
  40 epochs, batch 8, seed 0), cross-entropy on logits bilinearly upsampled to the label resolution, ignore label
  excluded; for speed the training labels are first resized so that their long side is at most 160 px
  (``--train-label-side``) with ``nearest-exact`` (each pixel takes the label at the centre of the block it
  covers, aligned with the ``align_corners=False`` logits); the evaluation uses the full label resolution;
- mIoU over the classes present in the val ground truth, from one confusion matrix over all val pixels: the
  logits are bilinearly upsampled to the label resolution and argmaxed.

Formats: ``camvid`` (``images/{train,val}/*.jpg`` + ``labels/{train,val}/*.png``, ids 0..10, 11 ignore),
``voc`` (VOCdevkit ``JPEGImages``, ``SegmentationClass`` palette PNGs with 255 ignore,
``ImageSets/Segmentation/{train,val}.txt``, 21 classes), ``ade20k`` (``images/{training,validation}/*.jpg`` +
``annotations/{training,validation}/*.png``, 0 ignore, 1..150 -> classes 0..149).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
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

IGNORE = 255

CAMVID_CLASSES = [
    "sky", "building", "pole", "road", "pavement", "tree", "sign/symbol", "fence", "car", "pedestrian", "bicyclist",
]  # fmt: skip
VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]  # fmt: skip


@dataclass(frozen=True)
class SegFormat:
    """How one dataset family is laid out on disk and how its label PNGs map to class ids."""

    name: str
    num_classes: int
    splits: tuple[str, str]  # (train, val) folder or list names
    layout: str
    class_names: tuple[str, ...] = ()

    def pairs(self, root: Path, split: str) -> list[tuple[Path, Path]]:
        """(image, label) paths of one split, checked to exist."""
        if self.name == "voc":
            listing = root / "ImageSets" / "Segmentation" / f"{split}.txt"
            if not listing.is_file():
                raise FeatliftError(f"{listing}: no such file; expected {self.name} layout: {self.layout}")
            ids = [line.split()[0] for line in listing.read_text().splitlines() if line.strip()]
            pairs = [(root / "JPEGImages" / f"{i}.jpg", root / "SegmentationClass" / f"{i}.png") for i in ids]
        else:
            image_dir, label_dir = (
                (root / "images" / split, root / "labels" / split)
                if self.name == "camvid"
                else (root / "images" / split, root / "annotations" / split)
            )
            for folder in (image_dir, label_dir):
                if not folder.is_dir():
                    raise FeatliftError(
                        f"{folder}: no such folder; expected {self.name} layout: {self.layout}"
                    )
            images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
            pairs = [(p, label_dir / f"{p.stem}.png") for p in images]
        if not pairs:
            raise FeatliftError(f"{root}: no {split} images; expected {self.name} layout: {self.layout}")
        for image, label in pairs:
            for path in (image, label):
                if not path.is_file():
                    raise FeatliftError(f"{path}: no such file; expected {self.name} layout: {self.layout}")
        return pairs

    def read_label(self, path: Path) -> np.ndarray:
        """Label PNG -> ``[H, W]`` uint8 class ids in ``0..num_classes-1``, `IGNORE` (255) elsewhere."""
        try:
            with Image.open(path) as image:
                array = np.array(image)
        except OSError as exc:
            raise FeatliftError(f"{path}: cannot read label PNG ({exc})") from exc
        if array.ndim != 2:
            raise FeatliftError(
                f"{path}: expected a single-channel label PNG (class ids), got shape {array.shape}"
            )
        array = array.astype(np.int64)
        if self.name == "ade20k":
            array = array - 1  # 0 (other) -> -1 -> ignore
        out = np.full(array.shape, IGNORE, np.uint8)
        valid = (array >= 0) & (array < self.num_classes)
        out[valid] = array[valid]
        return out


FORMATS = {
    "camvid": SegFormat(
        "camvid",
        11,
        ("train", "val"),
        "ROOT/images/{train,val}/<name>.jpg + ROOT/labels/{train,val}/<name>.png (uint8 ids 0..10, 11 ignore)",
        tuple(CAMVID_CLASSES),
    ),
    "voc": SegFormat(
        "voc",
        21,
        ("train", "val"),
        "ROOT/JPEGImages/<id>.jpg, ROOT/SegmentationClass/<id>.png (palette, 255 ignore), "
        "ROOT/ImageSets/Segmentation/{train,val}.txt",
        tuple(VOC_CLASSES),
    ),
    "ade20k": SegFormat(
        "ade20k",
        150,
        ("training", "validation"),
        "ROOT/images/{training,validation}/<name>.jpg + ROOT/annotations/{training,validation}/<name>.png "
        "(0 ignore, 1..150 classes)",
    ),
}


@dataclass
class ProbeRecipe:
    """The training recipe of the linear probe; the same for every variant."""

    epochs: int = 40
    lr: float = 1e-2
    weight_decay: float = 1e-4
    batch_size: int = 8
    seed: int = 0
    train_label_side: int = 160

    def describe(self) -> dict:
        return {
            "model": "linear layer (1x1 conv) on per-channel standardised features (train statistics)",
            "optimizer": f"AdamW lr {self.lr} weight decay {self.weight_decay}, cosine schedule to 0",
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "loss": "cross-entropy on logits bilinearly upsampled to the label resolution, ignore label excluded; "
            f"training labels resized (nearest-exact, block centres) to a long side of at most {self.train_label_side} px",
            "evaluation": "logits bilinearly upsampled to the full label resolution, argmax",
            "features": "computed once per variant, cached as float16",
        }


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[K, K]`` counts (rows: ground truth, columns: prediction) over pixels whose target is not ignored."""
    keep = target != IGNORE
    index = target[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_from_confusion(confusion: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class IoU ``TP / (TP + FP + FN)`` and a mask of the classes present in the ground truth."""
    confusion = confusion.double()
    tp = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp_min(1), torch.zeros_like(tp))
    return iou, confusion.sum(1) > 0


def _cache_features(
    timer: FeatureTimer, images: list[Path], size: tuple[int, int], batch_size: int
) -> torch.Tensor:
    chunks = []
    for start in range(0, len(images), batch_size):
        batch = load_inputs(images[start : start + batch_size], size, timer.wants_sources)
        chunks.append(timer(*batch).to("cpu", torch.float16))
    return torch.cat(chunks)


def shrink_label(label: torch.Tensor, max_side: int) -> torch.Tensor:
    """Resize a ``[H, W]`` label map so that its long side is at most `max_side` (kept if smaller).

    ``nearest-exact``: each output pixel takes the label at the centre of the block it covers, where the
    logits upsampled with ``align_corners=False`` put it (legacy ``nearest`` took the block's top-left pixel).
    """
    h, w = label.shape
    scale = max_side / max(h, w)
    if scale >= 1:
        return label
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    return F.interpolate(label[None, None].float(), size=size, mode="nearest-exact")[0, 0].to(label.dtype)


def _upsampled_loss(logits: torch.Tensor, labels: list[torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over all non-ignored pixels of a batch whose labels may differ in size."""
    total, count = logits.new_zeros(()), 0
    for logit, label in zip(logits, labels, strict=True):
        up = F.interpolate(logit[None], size=label.shape, mode="bilinear", align_corners=False)
        total = total + F.cross_entropy(up, label[None].long(), ignore_index=IGNORE, reduction="sum")
        count += int((label != IGNORE).sum())
    return total / max(count, 1)


def train_probe(
    features: torch.Tensor, labels: list[torch.Tensor], num_classes: int, recipe: ProbeRecipe
) -> torch.nn.Conv2d:
    """Fit a 1x1 conv ``C -> num_classes`` on standardised features ``[N, C, h, w]`` against label maps."""
    labels = [shrink_label(label, recipe.train_label_side) for label in labels]
    generator = torch.Generator().manual_seed(recipe.seed)
    torch.manual_seed(recipe.seed)
    head = torch.nn.Conv2d(features.shape[1], num_classes, 1)
    optimizer = torch.optim.AdamW(head.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    steps_per_epoch = math.ceil(len(features) / recipe.batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=recipe.epochs * steps_per_epoch)
    for epoch in range(recipe.epochs):
        order = torch.randperm(len(features), generator=generator)
        total = 0.0
        for start in range(0, len(order), recipe.batch_size):
            index = order[start : start + recipe.batch_size]
            loss = _upsampled_loss(head(features[index].float()), [labels[i] for i in index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += float(loss.detach()) * len(index)
        logger.debug("epoch %d: loss %.4f", epoch, total / len(features))
    return head.eval()


@torch.no_grad()
def score_probe(
    head: torch.nn.Conv2d, features: torch.Tensor, labels: list[torch.Tensor], num_classes: int
) -> torch.Tensor:
    """The confusion matrix of the probe's predictions at label resolution over a set of images."""
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    for feature, label in zip(features, labels, strict=True):
        logits = F.interpolate(
            head(feature[None].float()), size=label.shape, mode="bilinear", align_corners=False
        )
        confusion += confusion_matrix(logits[0].argmax(0), label, num_classes)
    return confusion


def evaluate_variant(
    variant: FeatureVariant,
    fmt: SegFormat,
    train: list[tuple[Path, Path]],
    val: list[tuple[Path, Path]],
    base: tuple[int, int],
    recipe: ProbeRecipe,
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    train_labels: list[torch.Tensor] | None = None,
    val_labels: list[torch.Tensor] | None = None,
) -> VariantResult:
    """Cache features, train the probe, and score it on `val`: mIoU and pixel accuracy (x100), per-class IoU."""
    timer = FeatureTimer(variant, device)
    size = variant.input_size(base)
    train_labels = train_labels or [torch.from_numpy(fmt.read_label(label)) for _, label in train]
    val_labels = val_labels or [torch.from_numpy(fmt.read_label(label)) for _, label in val]
    timer.warmup(
        *load_inputs([train[0][0]], size, timer.wants_sources)
    )  # one-off costs stay out of the timing
    train_features = _cache_features(timer, [image for image, _ in train], size, batch_size)
    val_features = _cache_features(timer, [image for image, _ in val], size, batch_size)
    mean = train_features.float().mean((0, 2, 3), keepdim=True)
    std = train_features.float().std((0, 2, 3), keepdim=True).clamp_min(1e-6)
    train_features = ((train_features.float() - mean) / std).half()
    val_features = ((val_features.float() - mean) / std).half()
    head = train_probe(train_features, train_labels, fmt.num_classes, recipe)
    confusion = score_probe(head, val_features, val_labels, fmt.num_classes)
    iou, present = iou_from_confusion(confusion)
    miou = 100 * float(iou[present].mean()) if present.any() else float("nan")
    accuracy = 100 * float(confusion.diag().sum() / confusion.sum().clamp_min(1))
    names = fmt.class_names or tuple(str(i) for i in range(fmt.num_classes))
    details = {
        "feature_grid": list(variant.output_grid(base)),
        "per_class_iou": {names[i]: 100 * float(iou[i]) for i in range(fmt.num_classes) if present[i]},
        "classes_present": int(present.sum()),
    }
    return timer.result({"mIoU": miou, "pixel acc": accuracy}, details)


@dataclass(kw_only=True)
class ProbeConfig(TaskConfig):
    """Settings of the probe task: ``data`` the dataset root in layout ``format`` (a key of `FORMATS`);
    ``limit_train`` / ``limit_val`` only the first N images of a split (None: all); ``batch_size`` images
    per feature and training batch; the rest is the `ProbeRecipe`."""

    data: str | Path
    format: str
    limit_train: int | None = None
    limit_val: int | None = None
    epochs: int = ProbeRecipe.epochs
    lr: float = ProbeRecipe.lr
    weight_decay: float = ProbeRecipe.weight_decay
    batch_size: int = ProbeRecipe.batch_size
    seed: int = ProbeRecipe.seed
    train_label_side: int = ProbeRecipe.train_label_side

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_choice("format", sorted(FORMATS))
        self.check_int("limit_train", 1, optional=True)
        self.check_int("limit_val", 1, optional=True)
        self.check_int("epochs", 1)
        self.check_float("lr", 0, low_open=True)
        self.check_float("weight_decay", 0)
        self.check_int("batch_size", 1)
        self.check_int("seed")
        self.check_int("train_label_side", 1)

    def recipe(self) -> ProbeRecipe:
        return ProbeRecipe(
            self.epochs, self.lr, self.weight_decay, self.batch_size, self.seed, self.train_label_side
        )


def evaluate_probe(
    config: ProbeConfig,
    variants: Sequence[FeatureVariant],
    device: torch.device | str = "cpu",
    weights: str | None = None,
    on_result: Callable[[VariantResult], None] | None = None,
) -> TaskResults:
    """mIoU and pixel accuracy of a linear probe on every variant; `on_result` sees each row as it is done;
    `weights` (the backbone's weights file) is recorded in the settings."""
    fmt = FORMATS[config.format]
    root = Path(config.data)
    if not root.is_dir():
        raise FeatliftError(f"{root}: no such folder; expected {fmt.name} layout: {fmt.layout}")
    train = fmt.pairs(root, fmt.splits[0])[: config.limit_train]
    val = fmt.pairs(root, fmt.splits[1])[: config.limit_val]
    train_labels = [torch.from_numpy(fmt.read_label(label)) for _, label in train]
    val_labels = [torch.from_numpy(fmt.read_label(label)) for _, label in val]
    check_sizes(variants, config.size)
    recipe = config.recipe()
    rows = evaluate_each(
        variants,
        lambda v: evaluate_variant(
            v, fmt, train, val, config.size, recipe, device, config.batch_size, train_labels, val_labels
        ),
        on_result,
    )
    settings = eval_settings(
        variants,
        config.size,
        device,
        weights,
        data=str(root),
        format=fmt.name,
        num_classes=fmt.num_classes,
        train_images=len(train),
        val_images=len(val),
        input_resize="bicubic to the base size (times the input scale), aspect ratio ignored",
        recipe=recipe.describe(),
        metric="mIoU over the classes present in the val ground truth (one confusion matrix over all val pixels)",
    )
    return TaskResults(f"probe ({fmt.name})", rows, settings, ["mIoU", "pixel acc"])
