"""``leaderboard.md`` and ``results.json`` of a comparison, from its cells.

Rows are methods, ranked by their mean quality rank over the tasks they have a result on (1 = best on every
task); per task the columns are its quality metric (``*``: on the task's quality-vs-ms Pareto front), ms per
image and peak MiB of the feature computation at the task's sizes (the task's own `FeatureTimer` numbers),
then the method's parameters and its training cost, if it was trained.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..environment import environment
from ..fileio import atomic_path, save_json_atomic
from .pareto import pareto_front


@dataclass
class Cell:
    """One finished (method, task) cell: the task's result row for the method, and whether it came from the cache."""

    method: str
    task: str
    metric: str
    result: dict[str, Any]
    hash: str
    cached: bool
    seconds: float
    environment: dict[str, Any] = field(default_factory=dict)  # where and under what load it was measured

    @property
    def quality(self) -> float:
        return float(self.result["metrics"].get(self.metric, math.nan))

    @property
    def ms_per_image(self) -> float:
        return float(self.result["ms_per_image"])

    @property
    def peak_memory_mib(self) -> float:
        return float(self.result["peak_memory_mib"])


@dataclass
class Leaderboard:
    methods: list[str]
    tasks: list[tuple[str, str]]  # (task, metric) of the tasks that ran
    cells: list[Cell]
    parameters: dict[str, int]
    training: dict[str, dict[str, Any]]
    skipped_tasks: dict[str, str] = field(default_factory=dict)
    failed: list[dict[str, str]] = field(default_factory=list)

    def cell(self, method: str, task: str) -> Cell | None:
        return next((c for c in self.cells if c.method == method and c.task == task), None)

    def points(self, task: str) -> list[tuple[str, float, float]]:
        """``(method, ms per image, quality)`` of every method with a result on `task`."""
        return [(c.method, c.ms_per_image, c.quality) for c in self.cells if c.task == task]

    def fronts(self) -> dict[str, list[str]]:
        return {task: pareto_front(self.points(task)) for task, _ in self.tasks}

    def mean_ranks(self) -> dict[str, float]:
        """Each method's quality rank per task (1 = best, ties share the better rank), averaged over its tasks."""
        ranks: dict[str, list[int]] = {m: [] for m in self.methods}
        for task, _ in self.tasks:
            scored = [
                (c.method, c.quality) for c in self.cells if c.task == task and math.isfinite(c.quality)
            ]
            for method, quality in scored:
                ranks[method].append(1 + sum(q > quality for _, q in scored))
        return {m: sum(r) / len(r) if r else math.nan for m, r in ranks.items()}

    def ordered_methods(self) -> list[str]:
        ranks = self.mean_ranks()
        return sorted(self.methods, key=lambda m: (math.isnan(ranks[m]), ranks[m], self.methods.index(m)))

    def markdown(self) -> str:
        ranks, fronts = self.mean_ranks(), self.fronts()
        header = ["rank", "method"]
        for task, metric in self.tasks:
            header += [f"{task} {metric}", f"{task} ms/img", f"{task} peak MiB"]
        header += ["params", "training"]
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        for method in self.ordered_methods():
            rank = ranks[method]
            row = ["-" if math.isnan(rank) else f"{rank:.2f}", f"`{method}`"]
            for task, _ in self.tasks:
                cell = self.cell(method, task)
                if cell is None:
                    row += ["-", "-", "-"]
                    continue
                mark = "*" if method in fronts[task] else ""
                row += [
                    f"{cell.quality:.1f}{mark}",
                    f"{cell.ms_per_image:.1f}",
                    f"{cell.peak_memory_mib:.0f}",
                ]
            row += [
                format_parameters(self.parameters.get(method)),
                format_training(self.training.get(method, {})),
            ]
            lines.append("| " + " | ".join(row) + " |")
        text = "\n".join(lines) + "\n"
        text += (
            "\nrank: mean quality rank over the tasks (1 = best); `*`: on the task's Pareto front of quality vs ms "
            "per image; ms/img and peak MiB: the feature computation (backbone + method) at the task's sizes; "
            "training: epochs x images @ image size, wall time.\n"
        )
        if self.skipped_tasks:
            text += "\nSkipped tasks:\n" + "".join(f"- {t}: {why}\n" for t, why in self.skipped_tasks.items())
        if self.failed:
            text += "\nFailed cells:\n" + "".join(
                f"- `{f['method']}` on {f['task']}: {f['error']}\n" for f in self.failed
            )
        return text

    def to_json(self, settings: dict[str, Any], device: str) -> dict[str, Any]:
        ranks, fronts = self.mean_ranks(), self.fronts()
        return {
            "settings": settings,
            "environment": environment(device),
            "tasks": [{"task": t, "metric": m, "pareto_front": fronts[t]} for t, m in self.tasks],
            "skipped_tasks": self.skipped_tasks,
            "failed_cells": self.failed,
            "methods": [
                {
                    "method": m,
                    "mean_rank": None if math.isnan(ranks[m]) else ranks[m],
                    "parameters": self.parameters.get(m),
                    "training": self.training.get(m, {}),
                }
                for m in self.ordered_methods()
            ],
            "cells": [
                {
                    "method": c.method,
                    "task": c.task,
                    "metric": c.metric,
                    "quality": c.quality,
                    "ms_per_image": c.ms_per_image,
                    "peak_memory_mib": c.peak_memory_mib,
                    "metrics": c.result["metrics"],
                    "details": c.result.get("details", {}),
                    "cell": c.hash,
                    "from_cache": c.cached,
                    "cell_seconds": c.seconds,
                    "environment": c.environment,
                }
                for c in self.cells
            ],
        }


def format_parameters(count: int | None) -> str:
    if count is None:
        return "-"
    if count >= 1e6:
        return f"{count / 1e6:.2f} M"
    if count >= 1e3:
        return f"{count / 1e3:.1f} k"
    return str(count)


def format_training(training: dict[str, Any]) -> str:
    if not training:
        return "-"
    size = f" @{training['image_size']} px" if training.get("image_size") else ""
    where = " (here)" if training.get("trained_here") else ""
    return f"{training.get('epochs')} ep x {training.get('train_images')} img{size}, {training.get('wall_time_s')} s{where}"


def write_leaderboard(
    out_dir: str | os.PathLike, board: Leaderboard, settings: dict[str, Any], device: str
) -> tuple[Path, Path]:
    """Write ``leaderboard.md`` and ``results.json`` into `out_dir`, each atomically."""
    out_dir = Path(out_dir)
    markdown = out_dir / "leaderboard.md"
    with atomic_path(markdown) as tmp:
        tmp.write_text(board.markdown())
    results = out_dir / "results.json"
    save_json_atomic(board.to_json(settings, device), results)
    return markdown, results


def panels(board: Leaderboard) -> Sequence[tuple[str, str, list[tuple[str, float, float]]]]:
    return [(task, metric, board.points(task)) for task, metric in board.tasks]
