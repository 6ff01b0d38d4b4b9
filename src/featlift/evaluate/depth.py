"""The ``depth`` task (``featlift eval depth``): a linear monocular-depth probe on frozen (upsampled) features,
with Probe3D's metrics (RMSE, delta1 < 1.25, abs rel; `depth_metrics`).

The probe follows Probe3D (El Banani et al., "Probing the 3D Awareness of Visual Foundation Models", CVPR 2024,
github mbanani/probe3d: ``DepthHead`` with ``head_type=linear``, ``prediction_type=bindepth``), which AnyUp's depth
evaluation follows too:

- head: a linear layer (1x1 conv) ``C -> 256`` depth-bin scores on the features, bilinearly upsampled to the
  depth map's resolution (scores and features upsample alike: both maps are linear); the scores become bin
  weights by ``w = relu(s) + 0.1`` normalised to sum 1 (AdaBins' "linear" normalisation, Probe3D's default),
  and the depth is ``sum_k w_k c_k`` over 256 bin centres spaced uniformly over [0.001, 10] m;
- loss: ``10 * SigLoss + 0.5 * gradient loss`` on the valid pixels (``0 < gt <= 10`` m): SigLoss
  ``sqrt(mean g^2 - 0.85 (mean g)^2)``, ``g = log(pred + 1e-3) - log(gt + 1e-3)`` over all valid pixels of a
  batch; the gradient loss (MegaDepth's, as in DINOv2/Probe3D): per image and at strides 1, 2, 4, 6, the sum of
  ``|g(p) - g(p + 2)|`` vertically and horizontally over pairs of valid pixels, divided by the number of valid
  pixels, summed over strides, averaged over the batch;
- optimiser: AdamW (lr 5e-4, weight decay 0.01), batch 8, 10 epochs, linear warm-up over 1.5 epochs from 1 %
  of the lr, then a quarter cosine down to 1 % (Probe3D's ``cosine_decay_linear_warmup``), stepped per batch;
- images: the central square of each image and its depth map (Probe3D's ``center_crop``: NYUv2's 640x480 ->
  480x480), the image resized (bicubic) to the base size times the variant's input scale;
- evaluation on the test split at the full resolution of the (cropped) depth maps; per-image metrics averaged
  over images, as measured ("scale-aware") and after a least-squares scale and shift per image (Probe3D's
  "scale-invariant" numbers, ``SI ...``).

What differs from Probe3D, and why (all recorded in results.json):

- features are standardised per channel with the train-set mean and std (as ``featlift eval probe`` does), so
  that one learning rate suits every variant whatever its feature scale; Probe3D feeds raw features;
- Probe3D's linear head upsamples the features 4x, predicts depth there and upsamples the depth; here the bin
  scores are upsampled to the depth map's resolution before the (non-linear) bin weighting, i.e. the probe is a
  linear layer on the features bilinearly upsampled to the label resolution, so that every variant is judged
  at the same resolution and the probe adds no upsampling of its own beyond bilinear;
- for speed the training depth maps are resized (``nearest-exact``, so holes stay holes) to a long side of at
  most 160 px (``train_label_side``); Probe3D trains at 480x480. The test uses the full resolution;
- no training augmentation (Probe3D: colour jitter and a random resized crop): a view's features are computed
  once per variant;
- Probe3D's gradient loss slices the batch and channel axes of a ``[B, 1, H, W]`` tensor (it compares image
  ``b`` with image ``b + 2``); here it is computed on each ``[H, W]`` map as MegaDepth/DINOv2 intend;
- images without any valid depth are left out of the averages (counted in ``images_without_valid_depth``).

Cost: the train features are held in memory (float16, standardised) when they fit ``cache_mib`` (default 2048
MiB: ``N * C * h * w * 2`` bytes, e.g. 795 NYUv2 train images at 64x64 x 384 channels = 2.4 GiB), else they are
computed again by the variant every epoch (``feature_cache: "recomputed each epoch"``; one more pass first for
the standardisation statistics); the test features are computed batch by batch and never held. The per-pixel
bin weights at test resolution are computed in bands of rows within ``predict_memory_mib``.

Layouts (``format``):

- ``nyu``: ``ROOT/images/{train,test}/<name>.{jpg,jpeg,png}`` with ``ROOT/depth/{train,test}/<name>.png``
  (16-bit greyscale, ``png_units_per_metre`` units per metre: 1000 = millimetres; 0 = no depth) or
  ``<name>.npy`` (a float ``[H, W]`` array in metres; 0, negative or non-finite = no depth);
- ``nyu-official-splits``: the export of the labelled NYUv2 set that BTS's
  ``extract_official_train_test_set_from_mat.py`` writes and BTS, AdaBins, ZoeDepth and DINOv2's depth code read:
  ``ROOT/official_splits/{train,test}/<scene>/rgb_<n>.jpg`` with ``sync_depth_<n>.png`` beside it (16-bit,
  millimetres; 795 train and 654 test images).

An image and its depth map must have the same size.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import FeatliftError
from ..images import image_to_tensor, load_image, resize_images
from ..upsamplers.chunking import chunk_length, chunk_slices
from ..variants import FeatureVariant
from .channel_statistics import ChannelMoments
from .dense_maps import centre_square, shrink_nearest
from .depth_metrics import DepthMetricMeans, valid_depth_mask
from .report import TaskResults, VariantResult, markdown_table
from .runner import FeatureTimer, check_sizes, eval_settings, evaluate_each
from .task_config import TaskConfig

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
CROPS = ("center", "none")
METRIC_COLUMNS = ["RMSE", "delta1", "abs rel"]


# ---------------------------------------------------------------------------------------- layouts


@dataclass(frozen=True)
class DepthLayout:
    """Where a dataset keeps its images and depth maps."""

    name: str
    layout: str

    def _refuse(self, path: Path, what: str) -> FeatliftError:
        return FeatliftError(f"{path}: {what}; expected {self.name} layout: {self.layout}")

    def pairs(self, root: Path, split: str) -> list[tuple[Path, Path]]:
        """(image, depth) paths of one split (``train`` or ``test``), sorted, checked to exist."""
        if self.name == "nyu":
            image_dir, depth_dir = root / "images" / split, root / "depth" / split
            for folder in (image_dir, depth_dir):
                if not folder.is_dir():
                    raise self._refuse(folder, "no such folder")
            pairs = []
            for image in sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
                candidates = [depth_dir / f"{image.stem}{suffix}" for suffix in (".png", ".npy")]
                found = [c for c in candidates if c.is_file()]
                if not found:
                    raise self._refuse(candidates[0], f"no such file (nor {candidates[1].name})")
                pairs.append((image, found[0]))
        else:
            split_dir = root / "official_splits" / split
            if not split_dir.is_dir():
                raise self._refuse(split_dir, "no such folder")
            pairs = []
            for image in sorted(split_dir.glob("*/rgb_*.jpg")):
                depth = image.with_name("sync_depth_" + image.stem[len("rgb_") :] + ".png")
                if not depth.is_file():
                    raise self._refuse(depth, "no such file")
                pairs.append((image, depth))
        if not pairs:
            raise self._refuse(root, f"no {split} images")
        return pairs


LAYOUTS = {
    "nyu": DepthLayout(
        "nyu",
        "ROOT/images/{train,test}/<name>.jpg|png + ROOT/depth/{train,test}/<name>.png (uint16, "
        "png_units_per_metre per metre, 0 = no depth) or <name>.npy (float metres)",
    ),
    "nyu-official-splits": DepthLayout(
        "nyu-official-splits",
        "ROOT/official_splits/{train,test}/<scene>/rgb_<n>.jpg + sync_depth_<n>.png (uint16 millimetres, 0 = no depth)",
    ),
}


def read_depth(path: str | Path, png_units_per_metre: float = 1000.0) -> np.ndarray:
    """A depth map file -> ``[H, W]`` float32 metres, 0 where there is no depth.

    ``.npy``: a float ``[H, W]`` (or ``[H, W, 1]``) array in metres; non-finite and negative values become 0.
    ``.png``: a 16-bit greyscale PNG in units of ``1 / png_units_per_metre`` m; 8-bit PNGs are refused (their
    256 levels are not a depth map).
    """
    path = Path(path)
    if path.suffix.lower() == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise FeatliftError(f"{path}: cannot read depth .npy ({exc})") from exc
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[:, :, 0]
        if array.ndim != 2 or not np.issubdtype(array.dtype, np.number):
            raise FeatliftError(
                f"{path}: expected a numeric [H, W] depth array in metres, got {array.dtype} {array.shape}"
            )
        depth = array.astype(np.float32)
        depth[~np.isfinite(depth) | (depth < 0)] = 0
        return depth
    try:
        with Image.open(path) as image:
            mode = image.mode
            array = np.array(image)
    except OSError as exc:
        raise FeatliftError(f"{path}: cannot read depth PNG ({exc})") from exc
    if array.ndim != 2 or mode not in ("I;16", "I;16B", "I;16L", "I"):
        raise FeatliftError(
            f"{path}: expected a 16-bit greyscale depth PNG (1/{png_units_per_metre:g} m per unit), "
            f"got mode {mode} shape {array.shape}"
        )
    depth = array.astype(np.float32) / float(png_units_per_metre)
    depth[depth < 0] = 0
    return depth


# ---------------------------------------------------------------------------------------- the probe


class DepthBinProbe(torch.nn.Module):
    """A 1x1 conv ``C -> bins`` whose scores, bilinearly upsampled, weight `bins` depth-bin centres spaced
    uniformly over ``[min_depth, max_depth]`` (weights ``relu(s) + 0.1``, normalised)."""

    WEIGHT_FLOOR = 0.1

    def __init__(self, channels: int, bins: int = 256, min_depth: float = 1e-3, max_depth: float = 10.0):
        super().__init__()
        self.scores = torch.nn.Conv2d(channels, bins, 1)
        self.register_buffer("bin_centres", torch.linspace(min_depth, max_depth, bins))

    def depth_from_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """``[B, bins, H, W]`` scores -> ``[B, H, W]`` depth."""
        weights = torch.relu(scores) + self.WEIGHT_FLOOR
        weights = weights / weights.sum(1, keepdim=True)
        return torch.einsum("bkhw,k->bhw", weights, self.bin_centres)

    def forward(self, features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """``[B, C, h, w]`` features -> ``[B, *size]`` depth (scores upsampled bilinearly to `size`)."""
        scores = F.interpolate(self.scores(features), size=size, mode="bilinear", align_corners=False)
        return self.depth_from_scores(scores)

    @torch.no_grad()
    def predict(
        self, features: torch.Tensor, size: tuple[int, int], max_memory_mib: float | None = None
    ) -> torch.Tensor:
        """``[C, h, w]`` -> ``[*size]``, equal to ``forward`` but computed in bands of output rows so that the
        ``bins x H x W`` weights never exist at once (bilinear upsampling is separable: rows and columns are
        two matrix products with `linear_resize_matrix`)."""
        scores = self.scores(features[None])[0]  # [K, h, w]
        bins, h, w = scores.shape
        height, width = size
        rows = linear_resize_matrix(h, height, scores.dtype)  # [H, h]
        cols = linear_resize_matrix(w, width, scores.dtype)  # [W, w]
        wide = torch.einsum("khw,xw->khx", scores, cols)  # [K, h, W]
        bytes_per_row = 3 * bins * width * scores.element_size()  # band scores, weights, weighted centres
        depth = scores.new_empty(size)
        for band in chunk_slices(height, chunk_length(height, bytes_per_row, None, max_memory_mib)):
            band_scores = torch.einsum("yh,khx->kyx", rows[band], wide)
            depth[band] = self.depth_from_scores(band_scores[None])[0]
        return depth


def linear_resize_matrix(size_in: int, size_out: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[size_out, size_in]``: the weights of torch's 1-D linear interpolation (``align_corners=False``), so
    that ``M @ x`` resizes ``x`` as ``F.interpolate(..., mode="linear")`` does."""
    identity = torch.eye(size_in, dtype=dtype)[None]  # channel i = the unit impulse at i
    return F.interpolate(identity, size=size_out, mode="linear", align_corners=False)[0].T.contiguous()


def sig_loss(
    preds: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
    valids: Sequence[torch.Tensor],
    variance_focus: float = 0.85,
    eps: float = 1e-3,
) -> torch.Tensor:
    """AdaBins' SigLoss over all valid pixels of a batch: ``sqrt(mean g^2 - variance_focus * (mean g)^2)``,
    ``g = log(pred + eps) - log(gt + eps)``."""
    g = torch.cat(
        [(p[v] + eps).log() - (t[v] + eps).log() for p, t, v in zip(preds, targets, valids, strict=True)]
    )
    if g.numel() == 0:
        return preds[0].sum() * 0
    return (g.square().mean() - variance_focus * g.mean().square()).clamp_min(1e-12).sqrt()


def gradient_loss(
    pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, eps: float = 1e-3, strides=(1, 2, 4, 6)
) -> torch.Tensor:
    """MegaDepth's multi-scale gradient-matching loss of one ``[H, W]`` map: at each stride, the absolute
    differences of the log-depth error between pixels two apart (vertically and horizontally), over pairs of
    valid pixels, divided by the number of valid pixels at that stride; summed over strides."""
    total = pred.sum() * 0
    for stride in strides:
        p, t, v = pred[::stride, ::stride], target[::stride, ::stride], valid[::stride, ::stride]
        count = int(v.sum())
        if count == 0:
            continue
        error = ((p + eps).log() - (t + eps).log()) * v
        vertical = (error[:-2] - error[2:]).abs() * (v[:-2] & v[2:])
        horizontal = (error[:, :-2] - error[:, 2:]).abs() * (v[:, :-2] & v[:, 2:])
        total = total + (vertical.sum() + horizontal.sum()) / count
    return total


def warmup_cosine_factor(step: int, total_steps: int, warmup_steps: float, floor: float = 0.01) -> float:
    """The lr factor of Probe3D's schedule: linear from `floor` to 1 over `warmup_steps`, then a quarter
    cosine from 1 down to `floor` at `total_steps`."""
    if warmup_steps > 0 and step <= warmup_steps:
        return floor + (1 - floor) * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1e-12, total_steps - warmup_steps))
    return floor + (1 - floor) * math.cos(0.5 * math.pi * progress)


@dataclass
class DepthRecipe:
    """The probe's training recipe and depth range; the same for every variant."""

    epochs: int = 10
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup_epochs: float = 1.5
    batch_size: int = 8
    seed: int = 0
    train_label_side: int = 160
    bins: int = 256
    min_depth: float = 1e-3
    max_depth: float = 10.0
    sig_weight: float = 10.0
    gradient_weight: float = 0.5

    def describe(self) -> dict:
        return {
            "model": f"linear layer (1x1 conv) C -> {self.bins} depth-bin scores on per-channel standardised "
            "features (train statistics), bilinearly upsampled to the depth map; bin weights relu(s) + 0.1 "
            f"normalised; depth = weighted sum of {self.bins} bin centres uniform in "
            f"[{self.min_depth:g}, {self.max_depth:g}] m",
            "loss": f"{self.sig_weight:g} * SigLoss (sqrt(mean g^2 - 0.85 (mean g)^2), g = log(pred + 1e-3) - "
            f"log(gt + 1e-3), over the valid pixels of a batch) + {self.gradient_weight:g} * gradient loss "
            "(per map, strides 1, 2, 4, 6, log-error differences 2 pixels apart)",
            "optimizer": f"AdamW lr {self.lr:g} weight decay {self.weight_decay:g}, linear warm-up over "
            f"{self.warmup_epochs:g} epochs from 1 % then quarter cosine to 1 %, per batch",
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "train_depth": f"resized (nearest-exact) to a long side of at most {self.train_label_side} px",
            "valid_pixels": f"ground truth finite, > 0 and <= {self.max_depth:g} m",
            "augmentation": "none",
        }


# ---------------------------------------------------------------------------------------- features


class TrainFeatures:
    """The standardised train features, batch by batch: held in memory (float16) when they fit `cache_mib`,
    else computed again by the variant every epoch."""

    def __init__(
        self,
        timer: FeatureTimer,
        images: Callable[[Sequence[int]], tuple[torch.Tensor, list[torch.Tensor] | None]],
        count: int,
        batch_size: int,
        cache_mib: float,
    ):
        self.timer, self.images, self.count, self.batch_size = timer, images, count, batch_size
        first = self._compute(range(min(batch_size, count)))
        self.bytes = count * first[0].numel() * 2
        self.cached = self.bytes <= cache_mib * 2**20
        moments = ChannelMoments()
        parts = []
        for start in range(0, count, batch_size):
            batch = first if start == 0 else self._compute(range(start, min(count, start + batch_size)))
            moments.add(batch)
            if self.cached:
                parts.append(batch.to(torch.float16))
        self.mean, self.std = moments.mean_std()
        self.cache = None
        if self.cached:
            self.cache = self.standardise(torch.cat(parts)).half()

    def _compute(self, index: Sequence[int]) -> torch.Tensor:
        return self.timer(*self.images(list(index))).to("cpu", torch.float32)

    def standardise(self, features: torch.Tensor) -> torch.Tensor:
        """Raw features -> standardised, rounded through float16 as the held features are (so that holding
        them or not gives the same probe)."""
        return ((features.half().float() - self.mean) / self.std).half().float()

    def batches(self, order: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(indices, standardised float32 features) for consecutive batches of `order`."""
        for start in range(0, len(order), self.batch_size):
            index = order[start : start + self.batch_size]
            if self.cache is not None:
                yield index, self.cache[index].float()
            else:
                yield index, self.standardise(self._compute(index.tolist()))

    def describe(self) -> str:
        mib = self.bytes / 2**20
        return (
            f"held in memory, float16 ({mib:.1f} MiB)"
            if self.cached
            else (f"recomputed each epoch (float16 cache would need {mib:.1f} MiB)")
        )


def train_depth_probe(
    features: TrainFeatures,
    depths: list[torch.Tensor],
    channels: int,
    recipe: DepthRecipe,
) -> tuple[DepthBinProbe, list[float]]:
    """Fit the probe on the train features against the (shrunk) depth maps; returns it and the seconds of each
    epoch (feature recomputation included when the features are not held)."""
    valids = [valid_depth_mask(d, recipe.max_depth) for d in depths]
    generator = torch.Generator().manual_seed(recipe.seed)
    torch.manual_seed(recipe.seed)
    probe = DepthBinProbe(channels, recipe.bins, recipe.min_depth, recipe.max_depth)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    steps_per_epoch = math.ceil(len(depths) / recipe.batch_size)
    total_steps, warmup_steps = recipe.epochs * steps_per_epoch, recipe.warmup_epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine_factor(step, total_steps, warmup_steps)
    )
    epoch_seconds = []
    for epoch in range(recipe.epochs):
        start_time = time.perf_counter()
        order = torch.randperm(len(depths), generator=generator)
        total = 0.0
        for index, batch in features.batches(order):
            targets = [depths[i] for i in index]
            masks = [valids[i] for i in index]
            preds = [probe(batch[k : k + 1], tuple(t.shape))[0] for k, t in enumerate(targets)]
            loss = recipe.sig_weight * sig_loss(preds, targets, masks)
            if recipe.gradient_weight:
                grads = [gradient_loss(p, t, v) for p, t, v in zip(preds, targets, masks, strict=True)]
                loss = loss + recipe.gradient_weight * torch.stack(grads).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += float(loss.detach()) * len(index)
        epoch_seconds.append(time.perf_counter() - start_time)
        logger.debug("epoch %d: loss %.4f (%.2f s)", epoch, total / len(depths), epoch_seconds[-1])
    return probe.eval(), epoch_seconds


# ---------------------------------------------------------------------------------------- the task


@dataclass(kw_only=True)
class DepthConfig(TaskConfig):
    """Settings of the depth task: ``data`` the dataset root in layout ``format`` (a key of `LAYOUTS`);
    ``crop`` "center" (the central square, Probe3D) or "none"; ``png_units_per_metre`` of 16-bit depth PNGs;
    ``limit_train`` / ``limit_test`` only the first N images of a split; ``cache_mib`` the most memory the
    train features may be held in (else recomputed each epoch); ``predict_memory_mib`` the working memory of
    a test prediction; the rest is the `DepthRecipe`."""

    data: str | Path
    format: str = "nyu"
    crop: str = "center"
    png_units_per_metre: float = 1000.0
    limit_train: int | None = None
    limit_test: int | None = None
    cache_mib: float = 2048.0
    predict_memory_mib: float = 512.0
    epochs: int = DepthRecipe.epochs
    lr: float = DepthRecipe.lr
    weight_decay: float = DepthRecipe.weight_decay
    warmup_epochs: float = DepthRecipe.warmup_epochs
    batch_size: int = DepthRecipe.batch_size
    seed: int = DepthRecipe.seed
    train_label_side: int = DepthRecipe.train_label_side
    max_depth: float = DepthRecipe.max_depth

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_choice("format", sorted(LAYOUTS))
        self.check_choice("crop", CROPS)
        self.check_float("png_units_per_metre", 0, low_open=True)
        self.check_int("limit_train", 1, optional=True)
        self.check_int("limit_test", 1, optional=True)
        self.check_float("cache_mib", 0)
        self.check_float("predict_memory_mib", 0, low_open=True)
        self.check_int("epochs", 1)
        self.check_float("lr", 0, low_open=True)
        self.check_float("weight_decay", 0)
        self.check_float("warmup_epochs", 0, self.epochs if _is_number(self.epochs) else None, high_open=True)
        self.check_int("batch_size", 1)
        self.check_int("seed")
        self.check_int("train_label_side", 1)
        self.check_float("max_depth", DepthRecipe.min_depth, low_open=True)

    def recipe(self) -> DepthRecipe:
        return DepthRecipe(
            epochs=self.epochs,
            lr=self.lr,
            weight_decay=self.weight_decay,
            warmup_epochs=self.warmup_epochs,
            batch_size=self.batch_size,
            seed=self.seed,
            train_label_side=self.train_label_side,
            max_depth=self.max_depth,
        )


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass
class DepthResults(TaskResults):
    """`TaskResults` whose table shows three decimals (RMSE in metres, delta1 and abs rel as fractions)."""

    def table(self) -> str:
        return markdown_table(self.rows, self.metric_names, digits=3)


def _metric_row(means: DepthMetricMeans) -> dict[str, float]:
    plain, aligned = means.means(), means.aligned_means()
    return {
        "RMSE": plain["rmse"],
        "delta1": plain["delta1"],
        "abs rel": plain["abs_rel"],
        "delta2": plain["delta2"],
        "delta3": plain["delta3"],
        "SI RMSE": aligned["rmse"],
        "SI delta1": aligned["delta1"],
        "SI abs rel": aligned["abs_rel"],
    }


class DepthSplit:
    """One split's (image, depth) pairs, with the depth maps read once (cropped; float32 metres)."""

    def __init__(self, pairs: list[tuple[Path, Path]], crop: str, png_units_per_metre: float):
        self.pairs, self.crop, self.units = pairs, crop, png_units_per_metre
        self.depths = [self._read_depth(image, depth) for image, depth in pairs]

    def _read_depth(self, image: Path, depth: Path) -> torch.Tensor:
        depth_map = torch.from_numpy(read_depth(depth, self.units))
        height, width = upright_size(image)
        if (height, width) != tuple(depth_map.shape):
            raise FeatliftError(
                f"{depth}: depth map is {depth_map.shape[0]}x{depth_map.shape[1]} but its image {image} is "
                f"{height}x{width} (HxW); expected the same size"
            )
        return (centre_square(depth_map) if self.crop == "center" else depth_map).contiguous()

    def images(self, index: Sequence[int], size: tuple[int, int], with_sources: bool):
        """The cropped images of `index` resized to `size` (and the cropped images, `with_sources`)."""
        decoded = []
        for i in index:
            image = image_to_tensor(load_image(self.pairs[i][0]))
            decoded.append((centre_square(image) if self.crop == "center" else image).contiguous())
        images = torch.cat([resize_images(image[None], size) for image in decoded])
        return images, (decoded if with_sources else None)


def upright_size(path: Path) -> tuple[int, int]:
    """(height, width) of an image as featlift reads it (EXIF orientation applied), from its header only."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            if image.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # orientations that swap width and height
                width, height = height, width
    except OSError as exc:
        raise FeatliftError(f"{path}: cannot read image ({exc})") from exc
    return height, width


def evaluate_variant(
    variant: FeatureVariant,
    train: DepthSplit,
    test: DepthSplit,
    base: tuple[int, int],
    recipe: DepthRecipe,
    device: torch.device | str = "cpu",
    cache_mib: float = 2048.0,
    predict_memory_mib: float = 512.0,
) -> VariantResult:
    """Train the probe on `train`'s features of `variant` and score it on `test`."""
    timer = FeatureTimer(variant, device)
    size = variant.input_size(base)
    timer.warmup(*train.images([0], size, timer.wants_sources))  # one-off costs stay out of the timing
    features = TrainFeatures(
        timer,
        lambda index: train.images(index, size, timer.wants_sources),
        len(train.pairs),
        recipe.batch_size,
        cache_mib,
    )
    depths = [shrink_nearest(depth, recipe.train_label_side) for depth in train.depths]
    channels = features.mean.shape[1]
    probe, epoch_seconds = train_depth_probe(features, depths, channels, recipe)
    means = DepthMetricMeans()
    for start in range(0, len(test.pairs), recipe.batch_size):
        index = list(range(start, min(len(test.pairs), start + recipe.batch_size)))
        batch = features.standardise(timer(*test.images(index, size, timer.wants_sources)).to("cpu"))
        for k, i in enumerate(index):
            gt = test.depths[i]
            pred = probe.predict(batch[k], tuple(gt.shape), predict_memory_mib)
            means.add(pred, gt, valid_depth_mask(gt, recipe.max_depth))
    details = {
        "feature_grid": list(variant.output_grid(base)),
        "test_images_scored": means.images,
        "images_without_valid_depth": means.images_without_valid_depth,
        "feature_cache": features.describe(),
        "probe_seconds_per_epoch": sum(epoch_seconds) / len(epoch_seconds),
    }
    return timer.result(_metric_row(means), details)


def constant_baseline(train: DepthSplit, test: DepthSplit, max_depth: float) -> dict[str, float]:
    """The metrics of predicting the mean valid train depth everywhere: what a probe must beat."""
    valid = [d[valid_depth_mask(d, max_depth)] for d in train.depths]
    values = torch.cat(valid).double() if valid else torch.zeros(0)
    mean_depth = float(values.mean()) if values.numel() else float("nan")
    means = DepthMetricMeans()
    for gt in test.depths:
        means.add(torch.full_like(gt, mean_depth), gt, valid_depth_mask(gt, max_depth))
    return {"depth_m": mean_depth, **_metric_row(means)}


def evaluate_depth(
    config: DepthConfig,
    variants: Sequence[FeatureVariant],
    device: torch.device | str = "cpu",
    weights: str | None = None,
    on_result: Callable[[VariantResult], None] | None = None,
) -> TaskResults:
    """RMSE, delta1 and abs rel (and delta2, delta3, the scale-and-shift aligned ``SI`` ones) of a linear depth
    probe on every variant; `on_result` sees each row as it is done; `weights` (the backbone's weights file)
    is recorded in the settings."""
    layout = LAYOUTS[config.format]
    root = Path(config.data)
    if not root.is_dir():
        raise FeatliftError(f"{root}: no such folder; expected {layout.name} layout: {layout.layout}")
    train = DepthSplit(
        layout.pairs(root, "train")[: config.limit_train], config.crop, config.png_units_per_metre
    )
    test = DepthSplit(
        layout.pairs(root, "test")[: config.limit_test], config.crop, config.png_units_per_metre
    )
    check_sizes(variants, config.size)
    recipe = config.recipe()
    rows = evaluate_each(
        variants,
        lambda v: evaluate_variant(
            v, train, test, config.size, recipe, device, config.cache_mib, config.predict_memory_mib
        ),
        on_result,
    )
    baseline = constant_baseline(train, test, recipe.max_depth)
    settings = eval_settings(
        variants,
        config.size,
        device,
        weights,
        data=str(root),
        format=layout.name,
        layout=layout.layout,
        png_units_per_metre=config.png_units_per_metre,
        crop="central square of image and depth (Probe3D)" if config.crop == "center" else "none",
        train_images=len(train.pairs),
        test_images=len(test.pairs),
        input_resize="bicubic to the base size (times the input scale), aspect ratio ignored",
        recipe=recipe.describe(),
        metrics="per test image over valid pixels, then averaged over images: RMSE (m), delta1 = fraction with "
        "max(pred/gt, gt/pred) < 1.25 (delta2, delta3: 1.25^2, 1.25^3), abs rel = mean |pred - gt| / gt; "
        "SI = after a per-image least-squares scale and shift of the prediction (Probe3D's scale-invariant)",
        evaluation_resolution="the (cropped) depth map's own",
        cache_mib=config.cache_mib,
        constant_baseline=baseline,
        protocol="Probe3D (mbanani/probe3d) linear bin-depth probe; differences listed in featlift.evaluate.depth",
    )
    note = (
        f"Constant predictor (mean train depth {baseline['depth_m']:.3f} m): RMSE {baseline['RMSE']:.3f}, "
        f"delta1 {baseline['delta1']:.3f}, abs rel {baseline['abs rel']:.3f}."
    )
    return DepthResults("depth (" + layout.name + ")", rows, settings, list(METRIC_COLUMNS), note)
