"""The ``probe`` task (``featlift eval probe``): linear-probe semantic segmentation on frozen (upsampled) features, mIoU.

The recipe is a named protocol (`featlift.evaluate.probe_protocols`, every setting documented there and recorded
in results.json): ``jafar`` (the JAFAR / AnyUp / UPLiFT tables: 448 px crops, features upsampled to the 448²
labels), ``jafar-original`` (the same with JAFAR's per-iteration schedule bug), ``cpu`` (224 px crops, features
at 4x the token grid, logits upsampled to the 224² labels) and ``featlift`` (the recipe of featlift before the
protocols: 224 px stretched, native features standardised, AdamW lr 1e-2, 40 epochs).

Features of the training images are computed by the variant once and cached (float16) when they fit the
memory budget ``cache_mib`` (both views when the protocol flips); otherwise they are recomputed batch by batch
in every epoch ("stream"), so a 448² x 384 map per image (150 MB in float16) is never held for a whole
training set. Raw tokens (``none``, ``input-2x``) and ``bilinear`` need neither: their features are a
bilinear resize of the tokens, and a 1x1 conv commutes with a resize whose weights sum to one, so the tokens
are cached and the head's logits are resized instead ("tokens", exact up to float rounding). Val features
are always computed batch by batch and scored at once.

Formats: `featlift.evaluate.seg_formats` (camvid, voc, ade20k, cityscapes, cocostuff, cocostuff171).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import FeatliftError
from ..images import image_to_tensor, load_image, resize_images
from ..upsamplers.base import resize_features
from ..upsamplers.bilinear import Bilinear
from ..variants import FeatureVariant
from .channel_statistics import ChannelMoments
from .dense_maps import centre_square, resize_nearest, shrink_nearest
from .probe_protocols import PROTOCOLS, ProbeProtocol, get_protocol
from .report import TaskResults, VariantResult
from .runner import FeatureTimer, check_sizes, eval_settings, evaluate_each
from .seg_formats import CAMVID_CLASSES, FORMATS, VOC_CLASSES, SegFormat
from .segmentation_metrics import IGNORE, confusion_matrix, iou_from_confusion, mean_iou, pixel_accuracy
from .task_config import TaskConfig

__all__ = [
    "CAMVID_CLASSES", "FORMATS", "IGNORE", "PROTOCOLS", "VOC_CLASSES", "ProbeConfig", "ProbeProtocol", "ProbeRecipe",
    "SegFormat", "confusion_matrix", "evaluate_probe", "evaluate_variant", "iou_from_confusion",
]  # fmt: skip

logger = logging.getLogger(__name__)

DEFAULT_CACHE_MIB = 2048


@dataclass
class ProbeRecipe:
    """The recipe of featlift's probe before the protocols (the ``featlift`` protocol), kept for callers that
    build it directly; `protocol` turns it into the `ProbeProtocol` it stands for."""

    epochs: int = 40
    lr: float = 1e-2
    weight_decay: float = 1e-4
    batch_size: int = 8
    seed: int = 0
    train_label_side: int = 160

    def protocol(self) -> ProbeProtocol:
        return PROTOCOLS["featlift"].with_overrides(
            epochs=self.epochs, lr=self.lr, weight_decay=self.weight_decay, batch_size=self.batch_size,
            seed=self.seed, train_label_side=self.train_label_side,
        )  # fmt: skip


def protocol_label(fmt: SegFormat, path: Path, protocol: ProbeProtocol) -> torch.Tensor:
    """A label map as the protocol scores it: cropped like the image, resized (nearest-exact) to the label size."""
    label = torch.from_numpy(fmt.read_label(path))
    if protocol.resize == "crop":
        label = centre_square(label)
    if protocol.label_size is not None:
        label = resize_nearest(label, (protocol.label_size, protocol.label_size))
    return label


def protocol_inputs(
    paths: Sequence[Path],
    protocol: ProbeProtocol,
    size: tuple[int, int],
    with_sources: bool,
    flip: bool = False,
) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """Images ``[B, 3, *size]`` in [0, 1] as the protocol feeds them (and the decoded sources, cropped alike)."""
    decoded = [image_to_tensor(load_image(p)) for p in paths]
    if protocol.resize == "crop":
        decoded = [centre_square(image) for image in decoded]
        images = torch.cat(
            [
                F.interpolate(image[None], size=size, mode="bilinear", antialias=True, align_corners=False)
                for image in decoded
            ]
        ).clamp(0, 1)
    else:
        images = torch.cat([resize_images(image[None], size) for image in decoded])
    if flip:
        images, decoded = images.flip(-1), [image.flip(-1) for image in decoded]
    return images, (decoded if with_sources else None)


def is_resized_tokens(variant: FeatureVariant) -> bool:
    """Whether the variant's features are a bilinear resize of the backbone's tokens (no upsampler, or
    `Bilinear`), so that a 1x1 head may be applied to the tokens and its logits resized instead."""
    pipeline = getattr(variant, "pipeline", None)
    if pipeline is None or not hasattr(pipeline, "output_size"):
        return False
    return pipeline.upsampler is None or isinstance(pipeline.upsampler, Bilinear)


class ProbeFeatures:
    """The features a probe trains and is scored on, for one variant under one protocol.

    ``batch(indices, flipped)`` -> features ``[B, C, h, w]`` (float32) and ``grid``, the size the variant's
    features have (the head's logits are resized to it when the mode is ``tokens``).
    """

    def __init__(
        self, variant, timer: FeatureTimer, images: list[Path], protocol: ProbeProtocol, base: tuple[int, int],
        cache_mib: float, batch_size: int,
    ):  # fmt: skip
        self.variant, self.timer, self.images, self.protocol = variant, timer, images, protocol
        self.base = base
        self.size = variant.input_size(base)
        self.batch_size = batch_size
        pipeline = getattr(variant, "pipeline", None)
        self.pipeline = pipeline if pipeline is not None and hasattr(pipeline, "output_size") else None
        self.grid = self._wanted_grid()
        self.tokens = is_resized_tokens(variant)
        self.mode = "tokens" if self.tokens else "stream"
        self.cache: dict[bool, torch.Tensor] = {}
        self.mean: torch.Tensor | None = None
        self.std: torch.Tensor | None = None
        views = (False, True) if protocol.flip else (False,)
        first = self._compute([0], False)
        bytes_all = first[0].numel() * 2 * len(images) * len(views)
        self.cache_mib_needed = bytes_all / 2**20
        if self.tokens or bytes_all <= cache_mib * 2**20:
            self.mode = "tokens" if self.tokens else "cached"
            for view in views:
                self.cache[view] = torch.cat(
                    [
                        self._compute(list(range(s, min(s + batch_size, len(images)))), view).half()
                        for s in range(0, len(images), batch_size)
                    ]
                )

    def _wanted_grid(self) -> tuple[int, int]:
        if self.protocol.feature_size == "label":
            return (self.protocol.label_size, self.protocol.label_size)
        if self.protocol.feature_size == "grid4x" and self.pipeline is not None:
            h, w = self.pipeline.backbone.grid_size(*self.size)
            return (4 * h, 4 * w)
        return tuple(self.variant.output_grid(self.base))

    def _compute(self, indices: list[int], flipped: bool) -> torch.Tensor:
        paths = [self.images[i] for i in indices]
        inputs = protocol_inputs(paths, self.protocol, self.size, self.timer.wants_sources, flipped)
        if self.pipeline is None:
            return self.timer(*inputs).float().cpu()
        saved = self.pipeline.output_size
        if self.tokens:
            self.pipeline.output_size = tuple(self.pipeline.backbone.grid_size(*self.size))
        elif self.protocol.feature_size != "native":
            self.pipeline.output_size = self.grid
        try:
            return self.timer(*inputs).float().cpu()
        finally:
            self.pipeline.output_size = saved

    def set_standardisation(self) -> None:
        """Per-channel mean and std over the (unflipped) training features, for protocols that standardise."""
        moments = ChannelMoments()
        for s in range(0, len(self.images), self.batch_size):
            indices = list(range(s, min(s + self.batch_size, len(self.images))))
            moments.add(self.cache[False][indices] if self.cache else self._compute(indices, False))
        self.mean, self.std = moments.mean_std()

    def batch(self, indices: list[int], flipped: bool = False) -> torch.Tensor:
        if self.cache:
            feats = self.cache[flipped][indices].float()
        else:
            feats = self._compute(indices, flipped)
        if self.mean is not None:
            feats = (feats - self.mean) / self.std
        return feats


def head_logits(
    head: torch.nn.Conv2d, features: torch.Tensor, grid: tuple[int, int], tokens: bool
) -> torch.Tensor:
    """The head's logits at the variant's feature grid (from the tokens, resized, when `tokens`)."""
    logits = head(features)
    return resize_features(logits, grid) if tokens else logits


def batch_loss(logits: torch.Tensor, labels: list[torch.Tensor]) -> torch.Tensor:
    """Cross-entropy, mean over all labelled pixels of a batch, with the logits bilinearly resized to each label."""
    total, count = logits.new_zeros(()), 0
    for logit, label in zip(logits, labels, strict=True):
        up = resize_features(logit[None], tuple(label.shape))
        total = total + F.cross_entropy(up, label[None].long(), ignore_index=IGNORE, reduction="sum")
        count += int((label != IGNORE).sum())
    return total / max(count, 1)


def make_schedule(optimizer, protocol: ProbeProtocol, steps_per_epoch: int):
    """Cosine annealing to 0 and whether it steps every iteration (see `ProbeProtocol.schedule`)."""
    t_max = protocol.epochs * steps_per_epoch if protocol.schedule == "per-iteration" else protocol.epochs
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=t_max)
    return scheduler, protocol.schedule != "per-epoch"


def train_head(
    features: ProbeFeatures, labels: list[torch.Tensor], num_classes: int, protocol: ProbeProtocol
) -> tuple[torch.nn.Conv2d, list[float]]:
    """Fit the 1x1 conv; returns it and the seconds each epoch took (feature recomputation included)."""
    if protocol.train_label_side is not None:
        labels = [shrink_nearest(label, protocol.train_label_side) for label in labels]
    generator = torch.Generator().manual_seed(protocol.seed)
    torch.manual_seed(protocol.seed)
    channels = features.batch([0]).shape[1]
    head = torch.nn.Conv2d(channels, num_classes, 1)
    optimizer = torch.optim.AdamW(
        head.parameters(), lr=protocol.lr, weight_decay=protocol.weight_decay, betas=(0.9, 0.999)
    )
    steps_per_epoch = math.ceil(len(labels) / protocol.batch_size)
    scheduler, per_iteration = make_schedule(optimizer, protocol, steps_per_epoch)
    epoch_seconds = []
    for epoch in range(protocol.epochs):
        start_time = time.perf_counter()
        order = torch.randperm(len(labels), generator=generator).tolist()
        total = 0.0
        for start in range(0, len(order), protocol.batch_size):
            index = order[start : start + protocol.batch_size]
            flipped = protocol.flip and bool(torch.rand((), generator=generator) < 0.5)
            batch_labels = [labels[i].flip(-1) if flipped else labels[i] for i in index]
            logits = head_logits(head, features.batch(index, flipped), features.grid, features.tokens)
            loss = batch_loss(logits, batch_labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if per_iteration:
                scheduler.step()
            total += float(loss.detach()) * len(index)
        if not per_iteration:
            scheduler.step()
        epoch_seconds.append(time.perf_counter() - start_time)
        logger.debug("epoch %d: loss %.4f (%.1f s)", epoch, total / len(labels), epoch_seconds[-1])
    return head.eval(), epoch_seconds


@torch.no_grad()
def score_head(
    head: torch.nn.Conv2d, features: ProbeFeatures, labels: list[torch.Tensor], num_classes: int
) -> torch.Tensor:
    """The confusion matrix of the probe's predictions at label resolution over a set of images."""
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    for start in range(0, len(labels), features.batch_size):
        index = list(range(start, min(start + features.batch_size, len(labels))))
        logits = head_logits(head, features.batch(index), features.grid, features.tokens)
        for logit, i in zip(logits, index, strict=True):
            up = resize_features(logit[None], tuple(labels[i].shape))
            confusion += confusion_matrix(up[0].argmax(0), labels[i], num_classes)
    return confusion


def evaluate_variant(
    variant: FeatureVariant,
    fmt: SegFormat,
    train: list[tuple[Path, Path]],
    val: list[tuple[Path, Path]],
    base: tuple[int, int],
    recipe: ProbeRecipe | ProbeProtocol,
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    train_labels: list[torch.Tensor] | None = None,
    val_labels: list[torch.Tensor] | None = None,
    cache_mib: float = DEFAULT_CACHE_MIB,
) -> VariantResult:
    """Train the probe on `train` and score it on `val` under a protocol (or the old `ProbeRecipe`): mIoU and
    pixel accuracy (x100), per-class IoU, and the seconds per training epoch."""
    protocol = recipe.protocol() if isinstance(recipe, ProbeRecipe) else recipe
    timer = FeatureTimer(variant, device)
    train_labels = train_labels or [protocol_label(fmt, label, protocol) for _, label in train]
    val_labels = val_labels or [protocol_label(fmt, label, protocol) for _, label in val]
    size = variant.input_size(base)
    timer.warmup(*protocol_inputs([train[0][0]], protocol, size, timer.wants_sources))
    train_features = ProbeFeatures(
        variant, timer, [i for i, _ in train], protocol, base, cache_mib, batch_size
    )
    if protocol.standardise:
        train_features.set_standardisation()
    head, epoch_seconds = train_head(train_features, train_labels, fmt.num_classes, protocol)
    val_features = ProbeFeatures(
        variant, timer, [i for i, _ in val], replace(protocol, flip=False), base, 0, batch_size
    )
    val_features.mean, val_features.std = train_features.mean, train_features.std
    confusion = score_head(head, val_features, val_labels, fmt.num_classes)
    iou, present = iou_from_confusion(confusion)
    names = fmt.class_names or tuple(str(i) for i in range(fmt.num_classes))
    details = {
        "protocol": protocol.name,
        "feature_grid": list(train_features.grid),
        "features": train_features.mode,
        "train_feature_mib": round(train_features.cache_mib_needed, 1),
        "seconds_per_epoch": [round(s, 2) for s in epoch_seconds],
        "per_class_iou": {names[i]: 100 * float(iou[i]) for i in range(fmt.num_classes) if present[i]},
        "classes_present": int(present.sum()),
    }
    return timer.result({"mIoU": mean_iou(confusion), "pixel acc": pixel_accuracy(confusion)}, details)


@dataclass(kw_only=True)
class ProbeConfig(TaskConfig):
    """Settings of the probe task: ``data`` the dataset root in layout ``format`` (a key of `FORMATS`);
    ``protocol`` a key of `PROTOCOLS`; ``limit_train`` / ``limit_val`` only the first N images of a split
    (None: all); ``epochs``, ``lr``, ``weight_decay``, ``batch_size``, ``seed``, ``train_label_side``:
    None keeps the protocol's value, anything else overrides it (and is named in the protocol's name);
    ``feature_batch`` images per feature call; ``cache_mib`` the budget for caching training features.
    ``size`` is the input size of the ``featlift`` protocol only; the others fix theirs."""

    data: str | Path
    format: str
    protocol: str = "featlift"
    limit_train: int | None = None
    limit_val: int | None = None
    epochs: int | None = None
    lr: float | None = None
    weight_decay: float | None = None
    batch_size: int | None = None
    seed: int | None = None
    train_label_side: int | None = None
    feature_batch: int = 8
    cache_mib: float = DEFAULT_CACHE_MIB

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_choice("format", sorted(FORMATS))
        self.check_choice("protocol", list(PROTOCOLS))
        self.check_int("limit_train", 1, optional=True)
        self.check_int("limit_val", 1, optional=True)
        self.check_int("epochs", 1, optional=True)
        if self.lr is not None:
            self.check_float("lr", 0, low_open=True)
        if self.weight_decay is not None:
            self.check_float("weight_decay", 0)
        self.check_int("batch_size", 1, optional=True)
        self.check_int("seed", optional=True)
        self.check_int("train_label_side", 1, optional=True)
        self.check_int("feature_batch", 1)
        self.check_float("cache_mib", 0)

    def resolved_protocol(self) -> ProbeProtocol:
        protocol = get_protocol(self.protocol)
        if self.protocol == "featlift" and tuple(self.size) != (protocol.input_size,) * 2:
            protocol = replace(protocol, input_size=self.size[0])
        return protocol.with_overrides(
            epochs=self.epochs, lr=self.lr, weight_decay=self.weight_decay, batch_size=self.batch_size,
            seed=self.seed, train_label_side=self.train_label_side,
        )  # fmt: skip

    def base_size(self) -> tuple[int, int]:
        if self.protocol == "featlift":
            return tuple(self.size)
        side = get_protocol(self.protocol).input_size
        return (side, side)


def evaluate_probe(
    config: ProbeConfig,
    variants: Sequence[FeatureVariant],
    device: torch.device | str = "cpu",
    weights: str | None = None,
    on_result: Callable[[VariantResult], None] | None = None,
) -> TaskResults:
    """mIoU and pixel accuracy of a linear probe on every variant under ``config.protocol``; `on_result` sees
    each row as it is done; `weights` (the backbone's weights file) is recorded in the settings."""
    fmt = FORMATS[config.format]
    root = Path(config.data)
    if not root.is_dir():
        raise FeatliftError(f"{root}: no such folder; expected {fmt.name} layout: {fmt.layout}")
    protocol = config.resolved_protocol()
    base = config.base_size()
    train = fmt.pairs(root, fmt.splits[0])[: config.limit_train]
    val = fmt.pairs(root, fmt.splits[1])[: config.limit_val]
    train_labels = [protocol_label(fmt, label, protocol) for _, label in train]
    val_labels = [protocol_label(fmt, label, protocol) for _, label in val]
    check_sizes(variants, base)
    rows = evaluate_each(
        variants,
        lambda v: evaluate_variant(
            v,
            fmt,
            train,
            val,
            base,
            protocol,
            device,
            config.feature_batch,
            train_labels,
            val_labels,
            config.cache_mib,
        ),  # fmt: skip
        on_result,
    )
    settings = eval_settings(
        variants,
        base,
        device,
        weights,
        data=str(root),
        format=fmt.name,
        num_classes=fmt.num_classes,
        train_images=len(train),
        val_images=len(val),
        protocol=protocol.name,
        recipe=protocol.describe(),
        cache_mib=config.cache_mib,
    )
    return TaskResults(f"probe ({fmt.name}, protocol {protocol.name})", rows, settings, ["mIoU", "pixel acc"])
