"""`run_compare`: every (method, task) cell, each from the cache when its key is there, else computed and stored;
then ``leaderboard.md``, ``results.json`` and ``pareto.png`` in the output folder.

Order: the tasks are located first (a task whose dataset is missing is reported and skipped) and their configs
built (a bad setting is refused before any work); then the methods are resolved, and, with ``train_missing``, the
trainable ones without a checkpoint are trained (or their training resumed) into the output folder; then the cells
run method by method, each method's module built once, only when one of its cells is not cached. A cell whose
task refuses the method (`FeatliftError`, e.g. an output size it cannot make) is reported and the others still
run; any other exception stops the run, and the cells finished before it stay cached.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..backbones import Backbone
from ..devices import resolve_device
from ..errors import FeatliftError
from ..evaluate.report import VariantResult
from ..evaluate.runner import prepare_variants
from ..evaluate.task_config import TaskConfig
from ..fileio import check_writable_dir
from ..variants import FeatureVariant
from .cells import CellCache, cell_key, key_hash
from .include import IncludedRun, load_included
from .leaderboard import Cell, Leaderboard, panels, write_leaderboard
from .methods import (
    BUDGET_FIELDS,
    Method,
    checkpoint_fingerprint,
    resolve_method,
    train_method,
    training_cost,
    with_checkpoint,
)
from .pareto import plot_fronts
from .tasks import CompareTask, config_settings, get_task, task_config

logger = logging.getLogger(__name__)

PLOT_FILE = "pareto.png"
DEFAULT_TRAIN_DATA = "imagenet-sample"  # under the data root, when --train-data is not given


@dataclass
class CompareOptions:
    """What `run_compare` takes. ``settings``: per task, config fields over the task's defaults
    (`tasks.parse_task_settings`); ``method_defaults``: options for every method that takes them (``--max-memory``);
    ``budget``: the training budget of ``train_missing`` (`methods.parse_budget`), the same for every method;
    ``train_data``: its images (default ``DATA_ROOT/imagenet-sample``)."""

    methods: list[str]
    tasks: list[str]
    data_root: str
    out: str
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    device: str | None = None
    weights: str | None = None
    method_defaults: dict[str, Any] = field(default_factory=dict)
    train_missing: bool = False
    train_data: str | None = None
    budget: dict[str, Any] = field(default_factory=lambda: dict(BUDGET_FIELDS))
    progress: bool = True
    # other comparisons' output folders, whose cells join the board (`include.load_included`)
    include: list[str] = field(default_factory=list)


@dataclass
class CompareOutcome:
    board: Leaderboard
    computed: int
    cached: int
    leaderboard: Path
    results: Path
    plot: Path | None
    included: int = 0  # cells joined from --include runs

    @property
    def complete(self) -> bool:
        """Every asked-for cell has a result: no task skipped, no cell failed."""
        return not self.board.skipped_tasks and not self.board.failed


@dataclass
class _ReadyTask:
    task: CompareTask
    config: TaskConfig


def evaluate_cell(
    task: CompareTask, config: TaskConfig, variant: FeatureVariant, device: torch.device, weights: str | None
) -> tuple[VariantResult, dict[str, Any]]:
    """One cell: the task's function on one variant -> (its result row, the task's settings block)."""
    results = task.function(config, [variant], device, weights)
    return results.rows[0], results.settings


class _CountingPipeline:
    """A variant's pipeline that moves a progress bar by the images it computes features of."""

    def __init__(self, pipeline: Any, bar: tqdm):
        self._pipeline = pipeline
        self._bar = bar

    def __call__(self, images: torch.Tensor, sources: Any = None) -> torch.Tensor:
        features = self._pipeline(images, sources)
        self._bar.update(int(images.shape[0]))
        return features

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipeline, name)


def _prepare_tasks(options: CompareOptions) -> tuple[list[_ReadyTask], dict[str, str]]:
    ready, skipped = [], {}
    for name in options.tasks:
        task = get_task(name)
        root = task.locate(options.data_root)
        if root is None:
            skipped[name] = task.missing_reason(options.data_root)
            logger.warning("task %s skipped: %s", name, skipped[name])
            continue
        config = task_config(task, root, options.settings.get(name, {}))
        config.check_data()
        ready.append(_ReadyTask(task, config))
    return ready, skipped


def _train_missing(methods: list[Method], backbone: Backbone, options: CompareOptions, out_dir: Path) -> None:
    missing = [m for m in methods if m.source == "missing"]
    if not missing or not options.train_missing:
        return
    images = options.train_data or str(Path(options.data_root) / DEFAULT_TRAIN_DATA)
    if not Path(images).exists():
        raise FeatliftError(
            f"--train-missing: training images {images}: no such folder (pass --train-data IMAGES)"
        )
    trained: dict[str, Path | FeatliftError] = {}
    for method in missing:
        if method.name not in trained:
            try:
                trained[method.name] = train_method(
                    method.name,
                    backbone,
                    images,
                    options.budget,
                    out_dir,
                    options.weights,
                    options.device,
                    options.progress,
                )
            except FeatliftError as exc:
                logger.warning("training %s failed: %s", method.name, exc)
                trained[method.name] = exc
        outcome = trained[method.name]
        if isinstance(outcome, FeatliftError):
            method.problem = f"training {method.name} failed: {outcome}"
            continue
        method.checkpoint, method.source, method.problem = str(outcome), "trained", None
        method.run_spec = with_checkpoint(method.spec, outcome)


def run_compare(options: CompareOptions, backbone: Backbone) -> CompareOutcome:
    """Run the comparison `options` describe on `backbone` (see the module docstring)."""
    if not options.methods and not options.include:
        raise FeatliftError("--methods: no method given (and no --include)")
    if len(set(options.methods)) != len(options.methods):
        raise FeatliftError(f"--methods repeat: {options.methods}")
    if not Path(options.data_root).is_dir():
        raise FeatliftError(
            f"--data-root {options.data_root}: no such folder (expected one holding davis2016/, voc2012/, camvid/, ...)"
        )
    device = resolve_device(options.device)
    ready, skipped = _prepare_tasks(options)  # bad settings and unknown methods are refused before any work
    methods = [resolve_method(spec, backbone) for spec in options.methods]
    backbone_id = {
        "name": backbone.name,
        "fingerprint": backbone.fingerprint(),
        "layer": backbone.layer,
        "facet": backbone.facet,
    }
    # the included runs are read and checked (settings, repeated methods) before any training or cell runs
    taken = {method: "this run's --methods" for method in options.methods}
    included: list[IncludedRun] = []
    for folder in options.include:
        run = load_included(folder, backbone_id, str(device), _task_settings(ready), taken)
        taken.update({method: f"--include {run.source}" for method in run.methods})
        included.append(run)
    out_dir = check_writable_dir(options.out, "output folder --out")
    _train_missing(methods, backbone, options, out_dir)
    cache = CellCache(out_dir)
    cells: list[Cell] = []
    failed: list[dict[str, str]] = []
    parameters: dict[str, int] = {}
    training: dict[str, dict[str, Any]] = {}
    computed = 0
    board = Leaderboard(
        list(options.methods),
        [(r.task.name, r.task.metric) for r in ready],
        cells,
        parameters,
        training,
        skipped,
        failed,
    )
    settings = _settings(options, backbone_id, device, ready, methods)
    _join(included, settings, board)

    outer = tqdm(
        total=len(methods) * len(ready),
        desc="cells",
        unit="cell",
        disable=not options.progress,
        dynamic_ncols=True,
    )
    try:
        for method in methods:
            fingerprint = None
            if method.problem is None:
                try:
                    fingerprint = checkpoint_fingerprint(method.checkpoint)
                    cost = training_cost(method.checkpoint)
                    if cost:
                        training[method.spec] = {**cost, "trained_here": method.source == "trained"}
                except FeatliftError as exc:
                    method.problem = str(exc)
            variant: FeatureVariant | None = None
            for item in ready:
                task = item.task
                outer.set_postfix_str(f"{method.spec} on {task.name}")
                if method.problem is not None:
                    failed.append({"method": method.spec, "task": task.name, "error": method.problem})
                    outer.update(1)
                    continue
                key = cell_key(
                    method.spec,
                    fingerprint,
                    options.method_defaults,
                    task.name,
                    task.protocol,
                    task.revision,
                    config_settings(item.config),
                    backbone_id,
                    str(device),
                )
                stored = cache.load(key)
                if stored is None:
                    try:
                        if variant is None:
                            variant = prepare_variants(
                                [method.run_spec], backbone, device, options.method_defaults
                            )[0]
                            variant.label = method.spec
                        stored = _compute(cache, key, task, item.config, variant, device, options)
                        computed += 1
                    except FeatliftError as exc:
                        logger.warning("%s on %s failed: %s", method.spec, task.name, exc)
                        failed.append({"method": method.spec, "task": task.name, "error": str(exc)})
                        outer.update(1)
                        continue
                    cached = False
                else:
                    cached = True
                parameters[method.spec] = stored.get("parameters", 0)
                cells.append(
                    Cell(
                        method.spec,
                        task.name,
                        task.metric,
                        stored["result"],
                        key_hash(key),
                        cached,
                        stored["cell_seconds"],
                        stored.get("environment", {}),  # cells cached before featlift recorded it have none
                    )
                )
                write_leaderboard(
                    out_dir, board, settings, str(device)
                )  # a killed run still shows what it has
                outer.update(1)
            if variant is not None:
                del variant
                gc.collect()  # the method's module is freed before the next one is built
    finally:
        outer.close()
    leaderboard, results = write_leaderboard(out_dir, board, settings, str(device))
    plot = plot_fronts(panels(board), out_dir / PLOT_FILE)
    joined = sum(len(run.cells) for run in included)
    return CompareOutcome(board, computed, len(cells) - computed - joined, leaderboard, results, plot, joined)


def _join(included: list[IncludedRun], settings: dict[str, Any], board: Leaderboard) -> None:
    """Add the cells of the `included` comparisons to `board`, after this run's methods, and record them in
    `settings`."""
    for run in included:
        board.methods.extend(run.methods)
        board.cells.extend(run.cells)
        board.parameters.update({m: run.parameters[m] for m in run.methods if m in run.parameters})
        board.training.update({m: run.training[m] for m in run.methods if m in run.training})
    if included:
        settings["included"] = [
            {"results": str(run.source), "methods": run.methods, "data": run.data} for run in included
        ]


def _compute(
    cache: CellCache,
    key: dict[str, Any],
    task: CompareTask,
    config: TaskConfig,
    variant: FeatureVariant,
    device: torch.device,
    options: CompareOptions,
) -> dict[str, Any]:
    bar = tqdm(
        desc=f"  {variant.label} on {task.name}",
        unit="img",
        leave=False,
        position=1,
        disable=not options.progress,
        dynamic_ncols=True,
    )
    pipeline = variant.pipeline
    variant.pipeline = _CountingPipeline(pipeline, bar)
    start = time.perf_counter()
    try:
        row, task_settings = evaluate_cell(task, config, variant, device, options.weights)
    finally:
        variant.pipeline = pipeline
        bar.close()
    row.variant = variant.label
    return cache.store(key, row, task_settings, time.perf_counter() - start, variant.parameter_count())


def _settings(
    options: CompareOptions,
    backbone_id: dict[str, Any],
    device: torch.device,
    ready: list[_ReadyTask],
    methods: list[Method],
) -> dict[str, Any]:
    return {
        "backbone": backbone_id,
        "weights": options.weights,
        "device": str(device),
        "data_root": str(options.data_root),
        "tasks": _task_settings(ready),
        "methods": [
            {"spec": m.spec, "run_spec": m.run_spec, "checkpoint": m.checkpoint, "source": m.source}
            for m in methods
        ],
        "method_defaults": options.method_defaults,
        "train_missing": options.train_missing,
        "train_data": options.train_data if options.train_missing else None,
        "budget": options.budget if options.train_missing else None,
    }


def _task_settings(ready: list[_ReadyTask]) -> dict[str, dict[str, Any]]:
    """Each task's protocol, revision and config fields, as ``results.json`` records them."""
    return {
        r.task.name: {"protocol": r.task.protocol, "revision": r.task.revision, **config_settings(r.config)}
        for r in ready
    }
