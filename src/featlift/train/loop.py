"""Self-supervised training of an upsampler on a folder of images, with a plug-in objective (`objectives`).

One `train` call: check the output and cache folders, build the frozen backbone, the upsampler
(`Upsampler.from_features`) and its objective (``--objective``, default the upsampler's
``capabilities.objective``), scan and split the images, then run epochs. Each step loads the views the
objective declares (`views`: pixels, and backbone features from the cache or computed and cached), hands
the objective a `batches.Batch` and takes one Adam step on its loss. After every epoch the objective
validates on the held-out images and runs its post-epoch hook (LiFT's fits ``output_scale``), then the loop
writes ``train_state.safetensors`` (for ``--resume``) and ``model.safetensors`` + ``config.json`` (loadable
by `load_checkpoint` at any time), all atomically. Under torchrun it runs DDP (`distributed`). What may
already be in ``--out`` is checked first (`run_folder`); a non-finite step or an epoch that could not be
loaded again stops the run before anything of it is saved (`divergence`).

An objective may have trainable modules of its own (``Objective.modules``, e.g. FeatUp's downsampler): they
are optimised with the upsampler and saved in the training state, not in the checkpoint.

Determinism: the data order depends only on (seed, epoch), the ``--augment`` jitter only on (seed, epoch,
step, slot), augmentation draws only on (seed, image, draw) and a stochastic objective's random numbers only
on (seed, epoch, step, rank), so a resumed run repeats the uninterrupted one; backbone features always go through the cache dtype, so a cold and a warm cache give the same inputs.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from ..backbones import Backbone, create_backbone
from ..checkpoint import save_checkpoint
from ..devices import resolve_device
from ..errors import FeatliftError
from ..fileio import atomic_path, check_writable_dir, remove_stale_temp_files
from ..upsamplers import Upsampler, get_upsampler_class
from .augment import jitter_seed
from .batches import Batch, ImageBatches
from .cache import DTYPES, FeatureCache, cache_key
from .config import TrainConfig
from .data import TrainImage, epoch_order, scan_images, split_images
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
from .objectives import EpochEnd, Objective, available_objectives, get_objective
from .run_folder import LOG_FILE, check_run_folder, clear_run_folder, missing_folders, remove_if_empty
from .state import check_resumable, load_state, save_state
from .validation import validate, validation_totals
from .views import check_view_sizes

logger = logging.getLogger(__name__)


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


class _LossModule(nn.Module):
    """The upsampler plus its objective's loss as one module, so DDP sees a single forward per step."""

    def __init__(self, upsampler: Upsampler, objective: Objective):
        super().__init__()
        self.upsampler = upsampler
        self.objective = objective
        self.objective_modules = nn.ModuleDict(objective.modules())  # empty for LiFT

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.objective.loss(self.upsampler, batch)


def _build_upsampler(config: TrainConfig, backbone: Backbone) -> Upsampler:
    cls = get_upsampler_class(config.upsampler)
    if not cls.capabilities.trainable:
        raise FeatliftError(
            f"--upsampler {config.upsampler}: has no weights to train; use a trainable upsampler such as lift"
        )
    args: dict[str, Any] = {}
    if "residual" in inspect.signature(cls.__init__).parameters:
        args["residual"] = config.residual
    elif not config.residual:
        raise FeatliftError(f"--no-residual: upsampler {config.upsampler} has no residual option")
    known = cls.setting_names()
    unknown = sorted(set(config.upsampler_args) - set(known))
    if unknown:
        raise FeatliftError(
            f"upsampler_args {unknown}: {config.upsampler} has no such setting; its settings: {', '.join(known) or 'none'}"
        )
    args.update(config.upsampler_args)
    return cls.from_features(backbone.channels, backbone.patch_size, **args)


def _build_objective(config: TrainConfig) -> Objective:
    name = config.objective or get_upsampler_class(config.upsampler).capabilities.objective
    if name is None:
        raise FeatliftError(
            f"--upsampler {config.upsampler} declares no training objective; pass --objective NAME "
            f"(available: {', '.join(available_objectives())})"
        )
    try:
        objective = get_objective(name)
    except FeatliftError as exc:
        raise FeatliftError(f"--objective {name}: {exc}") from None
    return objective(loss=config.loss)


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


def train(config: TrainConfig, backbone: Backbone | None = None) -> TrainResult:
    """Train an upsampler as `config` says; returns what it did. Under torchrun, runs DDP."""
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
    config: TrainConfig, device: torch.device, info: DistInfo, backbone: Backbone | None
) -> TrainResult:
    _check_config(config, info.world_size)
    objective = _build_objective(config)
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
    check_view_sizes(objective.views, config.image_size, backbone.patch_size, objective.name)
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
    objective.prepare(upsampler, backbone.channels)
    objective_modules = objective.modules()
    for module in objective_modules.values():
        module.to(device)
    settings = {
        "backbone": backbone.name,
        "fingerprint": backbone.fingerprint(),
        "layer": backbone.layer if len(backbone.layers) == 1 else list(backbone.layers),
        "facet": backbone.facet,
        "upsampler": config.upsampler,
        "objective": objective.name,
        # arguments the objective fits are not chosen: they are no setting a resume must match
        "upsampler_args": {k: v for k, v in upsampler.config().items() if k not in objective.fitted_args},
        "image_size": config.image_size,
        "batch_size": config.batch_size,
        "lr": config.lr,
        "loss": config.loss,
        "augment": config.augment,
        "seed": config.seed,
        "val_fraction": config.val_fraction,
        "train_digests": sorted(im.digest for im in train_images),
    }
    step_module: nn.Module = _LossModule(upsampler, objective)
    if info.enabled:
        if device.type == "cuda":
            step_module = nn.SyncBatchNorm.convert_sync_batchnorm(step_module)
        else:  # SyncBatchNorm needs an accelerator; this one all-reduces over gloo
            use_global_batchnorm(step_module)
        step_module = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[device.index] if device.type == "cuda" else None
        )
    parameters = list(upsampler.parameters())
    for module in objective_modules.values():
        parameters += list(module.parameters())
    optimizer = torch.optim.Adam(parameters, lr=config.lr)

    command = config.command or config.describe()
    start_epoch, history, wall_before, commands = 0, [], 0.0, [command]
    if saved is not None:
        check_resumable(saved["settings"], settings, run_dir)
        try:
            upsampler.load_state_dict(saved["model"])
            saved_modules = saved.get("objective_modules", {})
            if set(saved_modules) != set(objective_modules):
                raise ValueError(
                    f"objective modules {sorted(saved_modules) or 'none'} saved, {sorted(objective_modules) or 'none'} "
                    "in this run"
                )
            for name, module in objective_modules.items():
                module.load_state_dict(saved_modules[name])
            optimizer.load_state_dict(saved["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise FeatliftError(
                f"--resume: the training state in {run_dir} does not fit this run ({exc})"
            ) from exc
        start_epoch, history, wall_before = saved["epoch"], saved["history"], saved["wall_time_s"]
        for name in objective.fitted_args:
            fitted = [r[name] for r in history if name in r]
            if fitted:
                setattr(upsampler, name, fitted[-1])
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
            cache_key(backbone, config.image_size, objective.views, config.seed, config.cache_dtype),
            tuple(view.name for view in objective.views),
            config.cache_dtype,
        )
    batches_of = functools.partial(
        ImageBatches,
        backbone,
        views=objective.views,
        image_size=config.image_size,
        seed=config.seed,
        cache=cache,
        cache_dtype=config.cache_dtype,
        device=device,
        workers=config.workers,
    )
    loader, val_loader = batches_of(train_images), batches_of(val_images)

    def evaluate(images: list[TrainImage]) -> tuple[dict[str, float], int]:
        return validation_totals(objective, upsampler, batches_of(images), info)

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

    summarize = functools.partial(
        _summary, config, objective, commands, settings, scan, train_images, val_images, info=info
    )
    local_batch = config.batch_size // info.world_size
    guard = DivergenceGuard(run_dir, config.lr, start_epoch)
    started = time.perf_counter()
    try:
        for epoch in range(start_epoch, config.epochs):
            epoch_start = time.perf_counter()
            loader.reset_counts()
            val_loader.reset_counts()
            step_module.train()
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
                if config.augment:  # slot = position in the global batch, so DDP jitters as one process does
                    seeds = [
                        jitter_seed(config.seed, epoch, step, info.rank * local_batch + k)
                        for k in loaded.positions
                    ]
                    loaded = dataclasses.replace(loaded, jitter_seeds=seeds)
                loaded = dataclasses.replace(loaded, seed=config.seed, epoch=epoch)
                if objective.stochastic:  # dropout, projections: the same draws in a resumed run
                    torch.manual_seed(jitter_seed(config.seed, epoch, step, info.rank))
                loss = step_module(loaded)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                objective.after_step(upsampler)
                value = float(all_reduce_sum(loss.detach().clone(), info)) / info.world_size
                guard.after_step(value, upsampler, epoch, step)
                loss_sum += value
                loss_count += 1
                log.write({"type": "step", "epoch": epoch, "step": step, "loss": value})
                bar.set_postfix(loss=f"{value:.4f}")
                bar.update(1)
            bar.close()
            metrics = validate(objective, upsampler, val_loader, info)
            metrics.update(objective.after_epoch(upsampler, EpochEnd(epoch, train_images, evaluate)))
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
                "epoch %d/%d: loss %.4f%s (cache %d hits, %d misses)",
                epoch + 1,
                config.epochs,
                record["train_loss"],
                "".join(f", {k} {v}" for k, v in metrics.items()),
                record["cache_hits"],
                record["cache_misses"],
            )
            wall = wall_before + time.perf_counter() - started
            if info.is_main:
                summary = summarize(history, wall, epoch + 1)
                save_state(
                    run_dir,
                    {
                        "epoch": epoch + 1,
                        "model": upsampler.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "objective_modules": {name: m.state_dict() for name, m in objective_modules.items()},
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
        summary = summarize(history, wall, config.epochs)
        save_checkpoint(run_dir, upsampler, backbone, training=summary)
    return result(wall_time_s=wall, history=history, start_epoch=start_epoch)


def _summary(
    config, objective, commands, settings, scan, train_images, val_images, history, wall, epochs_done, info
) -> dict[str, Any]:
    args = asdict(config)
    args.pop("command", None)
    return {
        "command": commands[0],
        "resumed_with": commands[1:],
        "args": args,
        "objective": objective.description or objective.name,
        "objective_name": objective.name,
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
            {
                k: v
                for k, v in r.items()
                if k in ("epoch", "train_loss") or (k.startswith("val_") and k != "val_images")
            }
            for r in history
        ],
        "final_val": {k: v for k, v in (history[-1] if history else {}).items() if k.startswith("val_")},
        "backbone_fingerprint": settings["fingerprint"],
    }
