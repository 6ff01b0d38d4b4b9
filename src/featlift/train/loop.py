"""Self-supervised LiFT training on a folder of images (see `objectives` for the loss).

One `train` call: check the output and cache folders, build the frozen backbone, scan and split the
images, then run epochs. Each step loads the backbone features of its images from the cache (or
computes and caches them), jitters the guide images if asked, and takes one Adam step. After every
epoch it measures the validation cosine (LiFT and bilinear, 2x from ``S/2`` to ``S``) and fits LiFT's
``output_scale`` on a subset of the training images (`calibration_images`), then writes
``train_state.safetensors`` (for ``--resume``) and ``model.safetensors`` + ``config.json`` (loadable by
`load_checkpoint` at any time), all atomically. Under torchrun it runs DDP (`distributed`). What may
already be in ``--out`` is checked first (`run_folder`); a non-finite step or an epoch that could not
be loaded again stops the run before anything of it is saved (`divergence`).

Differences from the original LiFT recipe (all measured on DINOv2 ViT-S/14, 700 ImageNet images):

- img/2 and img/4 are antialiased (PIL bicubic) resizes, not strided ``[::2, ::2]`` subsamplings: that is
  what the backbone sees at inference (`featlift extract` resizes the same way). The two give nearly the
  same features (cosine 0.994, ``benchmarks/train_downsampling.py``), so this is about matching inference.
- residual LiFT by default (bilinear skip, zero-init head; ``--no-residual`` is the paper's module): after
  one epoch the paper's module is at validation cosine 0.845 vs bilinear 0.909, the residual one at 0.916.
- ``--augment`` jitters only the guide image; features come from the un-jittered image, so the cache stays
  valid (the original jitters the image before the backbone). Effect: +0.0002 / +0.002 validation cosine
  after 1 / 2 epochs, i.e. no measurable harm and little gain at this scale.
- backbone features are cached as float16 (relative rounding 2^-11), also on the first epoch, so cold and
  warm epochs see identical inputs.

Determinism: the data order depends only on (seed, epoch) and the jitter only on (seed, epoch, step,
slot), so a resumed run repeats the uninterrupted one; backbone features always go through the
cache dtype, so a cold and a warm cache give the same inputs.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import math
import shlex
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..backbones import ViTBackbone, create_backbone
from ..checkpoint import save_checkpoint
from ..errors import FeatliftError
from ..fileio import atomic_path, check_writable_dir, remove_stale_temp_files
from ..upsamplers import Upsampler, get_upsampler_class
from .augment import color_jitter, jitter_seed
from .cache import DTYPES, FeatureCache, cache_key
from .data import TrainImage, check_image_size, epoch_order, load_pyramid, scan_images, split_images
from .distributed import (
    DistInfo,
    all_ranks_agree,
    all_reduce_sum,
    barrier,
    rank_device,
    setup_distributed,
    teardown,
    use_global_batchnorm,
)
from .divergence import DivergenceGuard
from .objectives import LOSSES, lift_objective, validation_sums
from .run_folder import LOG_FILE, check_run_folder, clear_run_folder, missing_folders, remove_if_empty
from .state import check_resumable, load_state, save_state

logger = logging.getLogger(__name__)

CALIBRATION_IMAGES = 64  # training images that output_scale is fitted on after every epoch (at most)
RESIZE_METHOD = "upright-rgb8-torch-bicubic-aa-once"
OBJECTIVE = (
    "L(LiFT(img/2, f(img/2)), f(img)) + L(LiFT(img/4, f(img/4)), f(img/2)); img, img/2 and img/4 each resized "
    "once from the original (S x S, S/2, S/4) by torch's antialiased bicubic resize, as extract; frozen backbone; Adam"
)


@dataclass
class TrainConfig:
    """Everything `featlift train` takes; the defaults are the CLI's."""

    images: str
    out: str
    backbone: str = "vit_small_patch14_dinov2.lvd142m"
    weights: str | None = None
    layer: int | None = None
    facet: str = "token"
    upsampler: str = "lift"
    residual: bool = True
    epochs: int = 5
    batch_size: int = 8
    lr: float = 1e-3
    loss: str = "cosine"
    image_size: int = 448
    augment: bool = False
    cache: str | None = None  # default RUN_DIR/cache
    use_cache: bool = True
    cache_dtype: str = "float16"
    resume: bool = False
    overwrite: bool = False
    seed: int = 0
    val_fraction: float = 0.1
    device: str | None = None
    workers: int = 0
    progress: bool = True
    command: str | None = None


_FLAGS = {
    "residual": (False, "--no-residual"),
    "augment": (True, "--augment"),
    "use_cache": (False, "--no-cache"),
    "resume": (True, "--resume"),
    "overwrite": (True, "--overwrite"),
    "progress": (False, "--no-progress"),
}


def config_command(config: TrainConfig) -> str:
    """The `featlift train` command line that gives `config` (options at their defaults left out)."""
    defaults = TrainConfig(images="", out="")
    parts = ["featlift", "train", config.images, "--out", config.out]
    for name, value in asdict(config).items():
        if name in ("images", "out", "command", "cache_dtype") or value == getattr(defaults, name):
            continue
        if name in _FLAGS:
            if value == _FLAGS[name][0]:
                parts.append(_FLAGS[name][1])
        elif value is not None:
            parts += ["--" + name.replace("_", "-"), str(value)]
    return " ".join(shlex.quote(str(p)) for p in parts)


@dataclass
class TrainResult:
    run_dir: Path
    epochs: int
    train_images: int
    val_images: int
    skipped_images: int
    wall_time_s: float
    history: list[dict[str, Any]] = field(default_factory=list)
    start_epoch: int = 0  # epochs already done before this call (--resume); == epochs: nothing was trained

    @property
    def final(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}


class _Objective(nn.Module):
    """The upsampler plus its loss as one module, so DDP sees a single forward per step."""

    def __init__(self, upsampler: Upsampler, loss: str):
        super().__init__()
        self.upsampler = upsampler
        self.loss = loss

    def forward(self, guide2, guide4, f1, f2, f4):
        loss, _ = lift_objective(self.upsampler, guide2, guide4, f1, f2, f4, self.loss)
        return loss


class _PyramidDataset(Dataset):
    """Index -> (uint8 pyramid [S, S/2, S/4], cached features or None); runs in DataLoader workers."""

    def __init__(self, images: list[TrainImage], image_size: int, cache: FeatureCache | None):
        self.images = images
        self.image_size = image_size
        self.cache = cache

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image = self.images[index]
        try:
            pyramid = load_pyramid(image, self.image_size)
        except (OSError, FeatliftError) as exc:  # the file changed or vanished since the scan
            return index, None, None, str(exc)
        cached = self.cache.get(image.digest) if self.cache is not None else None
        return index, pyramid, cached, None


def _collate(items):
    return items


class _Batches:
    """Loads batches of images and their backbone features (cache first, backbone for misses)."""

    def __init__(self, backbone, images, image_size, cache, cache_dtype, device, workers):
        self.backbone = backbone
        self.dataset = _PyramidDataset(images, image_size, cache)
        self.cache = cache
        self.dtype = DTYPES[cache_dtype]
        self.device = device
        self.workers = workers
        self.hits = self.misses = self.failed = 0

    def reset_counts(self) -> None:
        self.hits = self.misses = self.failed = 0

    def iterate(self, batches: list[list[int]]):
        loader = DataLoader(
            self.dataset,
            batch_sampler=batches,
            num_workers=self.workers,
            collate_fn=_collate,
            persistent_workers=False,
        )
        for items in loader:
            yield self._assemble(items)

    @torch.no_grad()
    def _assemble(self, items):
        positions = [k for k, it in enumerate(items) if it[1] is not None]
        good = [items[k] for k in positions]
        for _, _, _, error in items:
            if error is not None:
                self.failed += 1
                logger.warning("skipping image that can no longer be read: %s", error)
        if not good:
            return None
        missing = [i for i, it in enumerate(good) if it[2] is None]
        features: list[list[torch.Tensor] | None] = [it[2] for it in good]
        if missing:
            for scale in range(3):
                batch = torch.stack([good[i][1][scale] for i in missing]).to(self.device).float().div_(255.0)
                out = self.backbone(self.backbone.normalize(batch)).to(self.dtype).cpu()
                for j, i in enumerate(missing):
                    if features[i] is None:
                        features[i] = []
                    features[i].append(out[j].clone())
            if self.cache is not None:
                for i in missing:
                    self.cache.put(self.dataset.images[good[i][0]].digest, features[i])
        self.misses += len(missing)
        self.hits += len(good) - len(missing)
        f1, f2, f4 = (torch.stack([f[s] for f in features]).to(self.device).float() for s in range(3))
        guides2 = [it[1][1] for it in good]
        guides4 = [it[1][2] for it in good]
        return positions, guides2, guides4, f1, f2, f4


def _guides(backbone, images: list[torch.Tensor], device, jitter_seeds: list[int] | None) -> torch.Tensor:
    out = []
    for k, image in enumerate(images):
        image = image.float().div(255.0)
        if jitter_seeds is not None:
            image = color_jitter(image, jitter_seeds[k])
        out.append(image)
    return backbone.normalize(torch.stack(out).to(device))


def _build_upsampler(config: TrainConfig, backbone: ViTBackbone) -> Upsampler:
    cls = get_upsampler_class(config.upsampler)
    if not getattr(cls, "trainable", False):
        raise FeatliftError(
            f"--upsampler {config.upsampler}: has no weights to train; use a trainable upsampler such as lift"
        )
    args: dict[str, Any] = {"channels": backbone.channels, "patch_size": backbone.patch_size}
    if "residual" in inspect.signature(cls.__init__).parameters:
        args["residual"] = config.residual
    elif not config.residual:
        raise FeatliftError(f"--no-residual: upsampler {config.upsampler} has no residual option")
    return cls(**args)


def _check_config(config: TrainConfig, world: int) -> None:
    if config.epochs < 1:
        raise FeatliftError(f"--epochs {config.epochs}: must be >= 1")
    if config.batch_size < 1:
        raise FeatliftError(f"--batch-size {config.batch_size}: must be >= 1")
    if config.batch_size % world:
        raise FeatliftError(
            f"--batch-size {config.batch_size} is the global batch and must be divisible by the {world} DDP processes"
        )
    if not (config.lr > 0 and math.isfinite(config.lr)):
        raise FeatliftError(f"--lr {config.lr}: must be a positive number")
    if config.loss not in LOSSES:
        raise FeatliftError(f"--loss {config.loss}: expected one of {', '.join(LOSSES)}")
    if config.cache_dtype not in DTYPES:
        raise FeatliftError(f"cache dtype {config.cache_dtype}: expected one of {', '.join(DTYPES)}")


class _Log:
    """``train_log.jsonl``: one JSON object per line; written by rank 0 only."""

    def __init__(self, path: Path, enabled: bool, keep_before_epoch: int | None):
        self.path = path
        self.enabled = enabled
        if not enabled:
            return
        kept: list[str] = []
        if keep_before_epoch is not None and path.is_file():
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by kill -9
                if record.get("epoch", -1) < keep_before_epoch:
                    kept.append(line)
        with atomic_path(path) as tmp:
            tmp.write_text("".join(line + "\n" for line in kept))
        self.handle = open(path, "a")

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            self.handle.write(json.dumps(record) + "\n")
            self.handle.flush()

    def close(self) -> None:
        if self.enabled:
            self.handle.close()


def train(config: TrainConfig, backbone: ViTBackbone | None = None) -> TrainResult:
    """Train an upsampler as `config` says; returns what it did. Under torchrun, runs DDP."""
    from ..devices import resolve_device

    device = resolve_device(config.device)
    info = setup_distributed(device)
    created = missing_folders(config.out)
    if config.use_cache:
        created += missing_folders(config.cache or Path(config.out) / "cache")
    try:
        return _train(config, rank_device(device, info), info, backbone)
    except BaseException:
        remove_if_empty(created)  # a failed run leaves no empty RUN_DIR or cache folder behind
        raise
    finally:
        teardown(info)


def _train(
    config: TrainConfig, device: torch.device, info: DistInfo, backbone: ViTBackbone | None
) -> TrainResult:
    _check_config(config, info.world_size)
    run_dir = check_writable_dir(config.out, "output folder --out")
    check_run_folder(run_dir, config.resume, config.overwrite)
    cache_root = None
    if config.use_cache:
        cache_root = check_writable_dir(config.cache or run_dir / "cache", "cache folder --cache")
        remove_stale_temp_files(cache_root, recursive=True)
    remove_stale_temp_files(run_dir)
    saved = load_state(run_dir) if config.resume else None
    barrier(info)  # every rank has looked at RUN_DIR before rank 0 writes to it (a late rank would refuse)
    if saved is not None and saved["epoch"] > config.epochs:
        raise FeatliftError(
            f"--resume --epochs {config.epochs}: the run in {run_dir} has already trained {saved['epoch']} "
            f"epochs and is never shortened; pass --epochs N with N > {saved['epoch']} to train it further"
        )
    if backbone is None:
        backbone = create_backbone(
            config.backbone, weights=config.weights, layer=config.layer, facet=config.facet
        )
    check_image_size(config.image_size, backbone.patch_size)
    backbone = backbone.to(device)

    scan = scan_images(config.images)
    train_images, val_images = split_images(scan.images, config.val_fraction, config.seed)
    logger.info(
        "%d images (%d train, %d validation), %d unreadable skipped",
        len(scan.images),
        len(train_images),
        len(val_images),
        len(scan.skipped),
    )
    result = functools.partial(
        TrainResult,
        run_dir=run_dir,
        epochs=config.epochs,
        train_images=len(train_images),
        val_images=len(val_images),
        skipped_images=len(scan.skipped),
    )

    torch.manual_seed(config.seed)
    upsampler = _build_upsampler(config, backbone).to(device)
    settings = {
        "backbone": backbone.name,
        "fingerprint": backbone.fingerprint(),
        "layer": backbone.layer,
        "facet": backbone.facet,
        "upsampler": config.upsampler,
        # output_scale is fitted during training, not chosen: it is no setting a resume must match
        "upsampler_args": {k: v for k, v in upsampler.config().items() if k != "output_scale"},
        "image_size": config.image_size,
        "batch_size": config.batch_size,
        "lr": config.lr,
        "loss": config.loss,
        "augment": config.augment,
        "seed": config.seed,
        "val_fraction": config.val_fraction,
        "train_digests": sorted(im.digest for im in train_images),
    }
    objective: nn.Module = _Objective(upsampler, config.loss)
    if info.enabled:
        if device.type == "cuda":
            objective = nn.SyncBatchNorm.convert_sync_batchnorm(objective)
        else:  # SyncBatchNorm needs an accelerator; this one all-reduces over gloo
            use_global_batchnorm(objective)
        objective = nn.parallel.DistributedDataParallel(
            objective, device_ids=[device.index] if device.type == "cuda" else None
        )
    optimizer = torch.optim.Adam(upsampler.parameters(), lr=config.lr)

    command = config.command or config_command(config)
    start_epoch, history, wall_before, commands = 0, [], 0.0, [command]
    if saved is not None:
        check_resumable(saved["settings"], settings, run_dir)
        try:
            upsampler.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise FeatliftError(
                f"--resume: the training state in {run_dir} does not fit this run ({exc})"
            ) from exc
        start_epoch, history, wall_before = saved["epoch"], saved["history"], saved["wall_time_s"]
        fitted = [r["output_scale"] for r in history if "output_scale" in r]
        if fitted and hasattr(upsampler, "output_scale"):
            upsampler.output_scale = fitted[-1]
        commands = [*saved.get("commands", []), command]
        logger.info("resuming %s after epoch %d", run_dir, start_epoch)
        if start_epoch == config.epochs:
            logger.info("%s has trained all %d epochs already: nothing to do", run_dir, start_epoch)
            return result(wall_time_s=wall_before, history=history, start_epoch=start_epoch)
    elif config.resume:
        logger.info("--resume: no training state in %s yet, starting from epoch 1", run_dir)
    if config.overwrite and info.is_main:
        clear_run_folder(run_dir)  # only now that every check has passed

    cache = None
    if cache_root is not None:
        cache = FeatureCache(
            cache_root,
            cache_key(backbone, config.image_size, RESIZE_METHOD, config.cache_dtype),
            config.cache_dtype,
        )
    loader = _Batches(
        backbone, train_images, config.image_size, cache, config.cache_dtype, device, config.workers
    )
    val_loader = _Batches(
        backbone, val_images, config.image_size, cache, config.cache_dtype, device, config.workers
    )
    calibration = calibration_images(train_images)
    calibration_loader = _Batches(
        backbone, calibration, config.image_size, cache, config.cache_dtype, device, config.workers
    )
    log = _Log(run_dir / LOG_FILE, info.is_main, keep_before_epoch=start_epoch if saved is not None else None)
    if start_epoch == 0:
        log.write(
            {
                "type": "start",
                "epoch": -1,
                "image_files": len(scan.images) + len(scan.skipped),
                "images": len(scan.images),
                "train_images": len(train_images),
                "val_images": len(val_images),
                "skipped_images": len(scan.skipped),
                "skipped": [path for path, _ in scan.skipped],
                "world_size": info.world_size,
                "settings": {k: v for k, v in settings.items() if k != "train_digests"},
            }
        )

    local_batch = config.batch_size // info.world_size
    guard = DivergenceGuard(run_dir, config.lr, start_epoch)
    started = time.perf_counter()
    try:
        for epoch in range(start_epoch, config.epochs):
            epoch_start = time.perf_counter()
            loader.reset_counts()
            val_loader.reset_counts()
            objective.train()
            batches = epoch_order(len(train_images), config.batch_size, config.seed, epoch)
            local = [b[info.rank * local_batch : (info.rank + 1) * local_batch] for b in batches]
            bar = tqdm(
                total=len(batches),
                desc=f"epoch {epoch + 1}/{config.epochs}",
                unit="step",
                disable=not (info.is_main and config.progress),
                dynamic_ncols=True,
            )
            loss_sum, loss_count = 0.0, 0
            for step, loaded in enumerate(loader.iterate(local)):
                # every rank takes the step or none does: a rank without images would skip the backward
                # that the others wait for in DDP's gradient all-reduce
                if not all_ranks_agree(loaded is not None, info):
                    if info.enabled:
                        logger.warning(
                            "step %d skipped on all %d processes: %s",
                            step + 1,
                            info.world_size,
                            "none of this process's images could be read"
                            if loaded is None
                            else "another process could read none of its images",
                        )
                    bar.update(1)
                    continue
                positions, raw2, raw4, f1, f2, f4 = loaded
                seeds = None
                if config.augment:  # slot = position in the global batch, so DDP jitters as one process does
                    seeds = [
                        jitter_seed(config.seed, epoch, step, info.rank * local_batch + k) for k in positions
                    ]
                guide2 = _guides(backbone, raw2, device, seeds)
                guide4 = _guides(backbone, raw4, device, [s + 1 for s in seeds] if seeds else None)
                loss = objective(guide2, guide4, f1, f2, f4)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                value = float(all_reduce_sum(loss.detach().clone(), info)) / info.world_size
                guard.after_step(value, upsampler, epoch, step)
                loss_sum += value
                loss_count += 1
                log.write({"type": "step", "epoch": epoch, "step": step, "loss": value})
                bar.set_postfix(loss=f"{value:.4f}")
                bar.update(1)
            bar.close()
            metrics = _validate(upsampler, val_loader, info)
            scale = _fit_output_scale(upsampler, calibration_loader, info)
            if scale is not None:
                upsampler.output_scale = scale  # saved with the checkpoint's config below
                metrics.update(output_scale=scale, output_scale_images=len(calibration))
            counts = torch.tensor(
                [
                    loader.hits + val_loader.hits,
                    loader.misses + val_loader.misses,
                    loader.failed + val_loader.failed,
                ],
                dtype=torch.float64,
            )
            counts = all_reduce_sum(counts, info).tolist()
            record = {
                "type": "epoch",
                "epoch": epoch,
                "train_loss": loss_sum / max(loss_count, 1),
                **metrics,
                "cache_hits": int(counts[0]),
                "cache_misses": int(counts[1]),
                "unreadable_images": int(counts[2]),
                "seconds": round(time.perf_counter() - epoch_start, 2),
            }
            guard.before_save(upsampler, epoch, record)  # on every rank, so all stop together
            history.append(record)
            log.write(record)
            logger.info(
                "epoch %d/%d: loss %.4f, val cosine LiFT %s vs bilinear %s (cache %d hits, %d misses)",
                epoch + 1,
                config.epochs,
                record["train_loss"],
                metrics.get("val_cosine_lift"),
                metrics.get("val_cosine_bilinear"),
                record["cache_hits"],
                record["cache_misses"],
            )
            wall = wall_before + time.perf_counter() - started
            if info.is_main:
                summary = _summary(
                    config, commands, settings, scan, train_images, val_images, history, wall, info, epoch + 1
                )
                save_state(
                    run_dir,
                    {
                        "epoch": epoch + 1,
                        "model": upsampler.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "history": history,
                        "wall_time_s": wall,
                        "settings": settings,
                        "commands": commands,
                    },
                )
                save_checkpoint(run_dir, upsampler, backbone, training=summary)
            barrier(info)
    finally:
        log.close()
    wall = wall_before + time.perf_counter() - started
    if info.is_main:
        if cache is not None:
            files, size = cache.size_bytes()
            if files:
                logger.info(
                    "feature cache %s: %d files, %.2f MB per image", cache.folder, files, size / files / 1e6
                )
        summary = _summary(
            config, commands, settings, scan, train_images, val_images, history, wall, info, config.epochs
        )
        save_checkpoint(run_dir, upsampler, backbone, training=summary)
    return result(wall_time_s=wall, history=history, start_epoch=start_epoch)


def calibration_images(train_images: list[TrainImage]) -> list[TrainImage]:
    """The training images that ``output_scale`` is fitted on: every k-th, at most `CALIBRATION_IMAGES`.

    Training images, so that the validation images stay held out for measuring the fitted module; a
    subset, so that the fit costs about as much as the validation and not another pass over the data.
    """
    step = max(1, math.ceil(len(train_images) / CALIBRATION_IMAGES))
    return train_images[::step]


def checkpoint_batches(
    backbone: ViTBackbone,
    images: list[TrainImage],
    image_size: int,
    cache: FeatureCache | None = None,
    cache_dtype: str = "float16",
    device: str | torch.device = "cpu",
) -> _Batches:
    """`images` loaded as `featlift train` loads them (pyramid, cached backbone features), for
    `validate_checkpoint` and `fit_output_scale` outside a training run."""
    return _Batches(backbone, images, image_size, cache, cache_dtype, torch.device(device), 0)


def validate_checkpoint(upsampler: Upsampler, batches: _Batches) -> dict[str, float]:
    """`featlift train`'s validation of `upsampler` on `batches` (`checkpoint_batches`): the cosine of LiFT
    and of bilinear to the backbone's 2x features."""
    return _validate(upsampler.to(batches.device), batches, DistInfo())


def fit_output_scale(upsampler: Upsampler, batches: _Batches) -> float | None:
    """`featlift train`'s fit of LiFT's ``output_scale`` on `batches` (`checkpoint_batches`): least squares
    to the backbone's 2x features; None for an upsampler without one or when no image loads."""
    return _fit_output_scale(upsampler.to(batches.device), batches, DistInfo())


@torch.no_grad()
def _sums(upsampler: Upsampler, loader: _Batches, info: DistInfo, batch_size: int = 8) -> list[float]:
    """`validation_sums` over the loader's images (each rank its share) and their count, summed over ranks."""
    images = list(range(len(loader.dataset)))[info.rank :: info.world_size]
    sums = torch.zeros(5, dtype=torch.float64)
    was_training = upsampler.training
    upsampler.eval()
    batches = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
    for loaded in loader.iterate(batches):
        if loaded is None:
            continue
        positions, raw2, _, f1, f2, _ = loaded
        guide2 = _guides(loader.backbone, raw2, loader.device, None)
        sums[:4] += validation_sums(upsampler, guide2, f1, f2).cpu()
        sums[4] += len(positions)
    upsampler.train(was_training)
    return all_reduce_sum(sums, info).tolist()


def _validate(upsampler: Upsampler, loader: _Batches, info: DistInfo) -> dict[str, float]:
    """Mean over held-out images of the cosine to f(img) of LiFT(img/2, f(img/2)) and of bilinear(f(img/2))."""
    cosine_lift, cosine_bilinear, _, _, count = _sums(upsampler, loader, info)
    if count == 0:
        return {}
    return {
        "val_cosine_lift": round(cosine_lift / count, 5),
        "val_cosine_bilinear": round(cosine_bilinear / count, 5),
        "val_images": int(count),
    }


def _fit_output_scale(upsampler: Upsampler, loader: _Batches, info: DistInfo) -> float | None:
    """The scale s minimising |s * LiFT_unscaled(img/2, f(img/2)) - f(img)|^2 over the loader's images."""
    if not hasattr(upsampler, "output_scale"):
        return None
    _, _, dot, square, _ = _sums(upsampler, loader, info)
    if square <= 0:
        return None
    return round(upsampler.output_scale * dot / square, 5)  # the current scale cancels out


def _summary(
    config, commands, settings, scan, train_images, val_images, history, wall, info, epochs_done
) -> dict[str, Any]:
    args = asdict(config)
    args.pop("command", None)
    return {
        "command": commands[0],
        "resumed_with": commands[1:],
        "args": args,
        "objective": OBJECTIVE,
        "epochs": epochs_done,
        "epochs_planned": config.epochs,
        "completed": epochs_done >= config.epochs,
        "images": len(scan.images),
        "train_images": len(train_images),
        "val_images": len(val_images),
        "skipped_images": len(scan.skipped),
        "world_size": info.world_size,
        "wall_time_s": round(wall, 1),
        "val": [
            {k: r[k] for k in ("epoch", "train_loss", "val_cosine_lift", "val_cosine_bilinear") if k in r}
            for r in history
        ],
        "final_val": {k: v for k, v in (history[-1] if history else {}).items() if k.startswith("val_")},
        "backbone_fingerprint": settings["fingerprint"],
    }
