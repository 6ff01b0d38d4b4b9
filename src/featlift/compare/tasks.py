"""The tasks `featlift compare` runs, by name: where each one's dataset lies under the data root, which task
function of `featlift.evaluate` scores a method on it, and which metric ranks the methods.

A task name is a row of `TASKS`. ``probe-voc`` and ``probe-camvid`` are the same probe task on two datasets;
the probe is called through `run_probe`, the one place that knows the probe's library signature; each probe row
runs under a named protocol: ``probe-voc`` is featlift's recipe, ``probe-voc@cpu`` and ``probe-voc@jafar``
the CPU-sized and the papers' 448 px protocols (`featlift.evaluate.probe_protocols`).
A new task (as ``depth``, NYUv2 under ``nyuv2/``, ranked by delta1) is one more row: its config class, its ``evaluate_*`` function, its dataset
folder and the metric to rank on.

Settings: each task builds its config dataclass (`featlift.evaluate.task_config.TaskConfig`) from the row's
``fixed`` fields (e.g. ``format="voc"``), then the
user's ``TASK.FIELD=VALUE`` settings, typed as the config class annotates the field; every other field keeps
the task's own default, as in ``featlift eval``.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import FeatliftError
from ..evaluate.davis import DavisConfig, evaluate_davis
from ..evaluate.depth import DepthConfig, evaluate_depth
from ..evaluate.probe import ProbeConfig, evaluate_probe
from ..evaluate.probe_protocols import PROTOCOLS
from ..evaluate.report import TaskResults
from ..evaluate.task_config import TaskConfig
from ..evaluate.warp import WarpConfig, evaluate_warp
from ..images import parse_size
from ..variants import FeatureVariant

# (config, variants, device, weights) -> TaskResults, one row per variant
TaskFunction = Callable[[Any, Sequence[FeatureVariant], torch.device | str, str | None], TaskResults]

PROBE_PROTOCOL = "featlift"  # the default probe recipe (`featlift.evaluate.probe_protocols`)


def run_probe(protocol: str) -> TaskFunction:
    """The probe task under the named `protocol` (a key of `featlift.evaluate.probe_protocols.PROTOCOLS`)."""
    if protocol not in PROTOCOLS:
        raise FeatliftError(f"probe protocol {protocol!r}: expected one of {', '.join(PROTOCOLS)}")

    def evaluate(config, variants, device, weights):
        if config.protocol != protocol:  # the row's fixed settings give it
            raise FeatliftError(f"probe task under {protocol!r} got a config for {config.protocol!r}")
        return evaluate_probe(config, variants, device=device, weights=weights)

    return evaluate


def _task_function(evaluate: Callable[..., TaskResults]) -> TaskFunction:
    def call(config, variants, device, weights):
        return evaluate(config, variants, device=device, weights=weights)

    return call


@dataclass(frozen=True)
class CompareTask:
    """One row of the task table.

    ``dataset``: the folder under the data root, as in ``../shared/data``; ``layouts``: where the task's root
    lies inside it, the first that exists is taken (``"."``: the folder itself); ``metric``: the quality
    column, higher is better; ``protocol``: the recipe's name, part of a cell's key; ``revision``: bump it
    when the task's metric code changes, so that cached cells of that task are computed again.
    """

    name: str
    dataset: str
    config_class: type[TaskConfig]
    function: TaskFunction = field(repr=False)
    metric: str
    fixed: dict[str, Any] = field(default_factory=dict)
    layouts: tuple[str, ...] = (".",)
    protocol: str = "default"
    revision: int = 1

    def locate(self, data_root: str | Path) -> Path | None:
        """The task's dataset root under `data_root`, or None when none of its layouts is there."""
        folder = Path(data_root) / self.dataset
        for layout in self.layouts:
            candidate = (folder / layout).resolve() if folder.is_dir() else None
            if candidate is not None and candidate.is_dir():
                return candidate
        return None

    def missing_reason(self, data_root: str | Path) -> str:
        folder = Path(data_root) / self.dataset
        inside = ", ".join(f"{folder / layout}" for layout in self.layouts if layout != ".")
        return f"{folder}: no such folder" + (f" (nor {inside})" if inside and folder.is_dir() else "")


TASKS: dict[str, CompareTask] = {
    "davis": CompareTask("davis", "davis2016", DavisConfig, _task_function(evaluate_davis), "J&F"),
    **{
        f"probe-{dataset}{'' if protocol == PROBE_PROTOCOL else '@' + protocol}": CompareTask(
            f"probe-{dataset}{'' if protocol == PROBE_PROTOCOL else '@' + protocol}",
            folder,
            ProbeConfig,
            run_probe(protocol),
            "mIoU",
            fixed={"format": dataset, "protocol": protocol},
            layouts=layouts,
            protocol=protocol,
        )
        for dataset, folder, layouts in (
            ("voc", "voc2012", ("VOCdevkit/VOC2012", "VOC2012", ".")),
            ("camvid", "camvid", (".",)),
        )
        for protocol in (PROBE_PROTOCOL, "cpu", "jafar")
    },
    "warp": CompareTask("warp", "imagenet-sample", WarpConfig, _task_function(evaluate_warp), "PCK@0.1"),
    "depth": CompareTask("depth", "nyuv2", DepthConfig, _task_function(evaluate_depth), "delta1"),
}


def get_task(name: str) -> CompareTask:
    if name not in TASKS:
        raise FeatliftError(f"task {name!r}: unknown; the tasks are {', '.join(TASKS)}")
    return TASKS[name]


def parse_task_settings(items: Sequence[str], tasks: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["davis.max_frames=4", "warp.limit=8"]`` -> ``{"davis": {"max_frames": 4}, "warp": {"limit": 8}}``,
    each value typed as the task's config class annotates the field. ``size=HxW`` (no task) sets every task's
    base size. Unknown tasks (not in `tasks`) and fields are refused, naming what there is."""
    settings: dict[str, dict[str, Any]] = {get_task(name).name: {} for name in tasks}
    for item in items:
        target, sep, text = item.partition("=")
        if not sep:
            raise FeatliftError(f"--set {item!r}: expected TASK.FIELD=VALUE (e.g. davis.max_frames=4)")
        name, dot, key = target.strip().rpartition(".")
        names = [name] if dot else list(tasks)
        for task_name in names:
            if task_name not in settings:
                raise FeatliftError(
                    f"--set {item!r}: task {task_name!r} is not among --tasks {','.join(tasks)}"
                )
            task = get_task(task_name)
            settings[task_name][key] = setting_value(task, key, text.strip(), item)
    return settings


# fields the comparison sets itself, so a user setting them would silently be overridden
RESERVED_FIELDS = ("data", "format", "masks_dir")


def setting_value(task: CompareTask, key: str, text: str, item: str) -> Any:
    """The value of ``key=text`` for `task`'s config class, typed as the class annotates the field."""
    names = [f.name for f in dataclasses.fields(task.config_class) if f.name not in RESERVED_FIELDS]
    if key not in names:
        raise FeatliftError(
            f"--set {item!r}: task {task.name} has no setting {key!r}; its settings: {', '.join(names)}"
        )
    annotation = typing.get_type_hints(task.config_class)[key]
    options = typing.get_args(annotation)
    if text.lower() == "none" and type(None) in options:
        return None
    kinds = [a for a in options if a is not type(None)] or [annotation]
    kind = typing.get_origin(kinds[0]) or kinds[0]
    try:
        if key == "size":
            return parse_size(text)
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return text.lower() in ("true", "1", "yes")
        if kind in (int, float):
            return kind(text)
        if kind in (list, tuple) or getattr(kind, "__name__", "") == "Sequence":
            return [part for part in text.split(",") if part]
        return text
    except (ValueError, FeatliftError):
        expected = getattr(kind, "__name__", str(kind))
        raise FeatliftError(f"--set {item!r}: {text!r} is not a valid {expected}") from None


def task_config(task: CompareTask, root: Path, settings: dict[str, Any]) -> TaskConfig:
    """The config of `task` on the dataset at `root`: the task's own defaults (as `featlift eval` has them),
    the row's fixed fields, then `settings` (checked by the config class, which names a bad value)."""
    values = {**task.fixed, **settings, "data": str(root)}
    return task.config_class(**values)


def config_settings(config: TaskConfig) -> dict[str, Any]:
    """A task config as JSON-ready values (paths as strings, tuples as lists): a cell key's task settings."""
    out = {}
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        if isinstance(value, Path):
            value = str(value)
        elif isinstance(value, tuple | list):
            value = list(value)
        out[item.name] = value
    return out
