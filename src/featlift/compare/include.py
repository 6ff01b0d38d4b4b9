"""Cells of another comparison joined to this one's leaderboard (``featlift compare --include DIR``).

A comparison run elsewhere (another session, another machine, a colleague's output folder) can join this one's
leaderboard without recomputing, as long as its cells answer the same questions: the same backbone (name, weights
fingerprint, layer, facet), the same device kind (the cost columns are the device's) and, for every task both
runs have, the same protocol, revision and config fields. The dataset's path is not compared: it differs between
machines; both runs' paths are recorded in ``results.json``. A mismatch is refused with the file and the fields
that differ, never silently mixed. A method that both runs have is refused too: the leaderboard would have two
rows of one name.

Only ``results.json`` is read (plain JSON): its cells, its methods' parameters and training cost, its settings.
Its cells of tasks this run does not have are left out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import FeatliftError
from .leaderboard import Cell

RESULTS_FILE = "results.json"
PATH_FIELDS = ("data",)  # task fields that name where the data lies, not what it is


@dataclass
class IncludedRun:
    """The cells another comparison contributes, with its methods' parameters and training cost."""

    source: Path
    methods: list[str]
    cells: list[Cell]
    parameters: dict[str, int] = field(default_factory=dict)
    training: dict[str, dict[str, Any]] = field(default_factory=dict)
    data: dict[str, str] = field(default_factory=dict)  # task -> that run's dataset path


def _read_results(folder: str | Path) -> tuple[Path, dict[str, Any]]:
    path = Path(folder)
    if path.is_dir():
        path = path / RESULTS_FILE
    if not path.is_file():
        raise FeatliftError(
            f"--include {folder}: no {RESULTS_FILE} there (expected the --out folder of a featlift compare run)"
        )
    try:
        results = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FeatliftError(f"--include {path}: not a readable JSON file ({exc})") from exc
    missing = [
        k for k in ("settings", "methods", "cells") if not isinstance(results, dict) or k not in results
    ]
    if missing:
        raise FeatliftError(
            f"--include {path}: not a featlift compare results.json (missing {', '.join(missing)})"
        )
    return path, results


def _differences(ours: dict[str, Any], theirs: dict[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    keys = sorted((set(ours) | set(theirs)) - set(ignore))
    return [
        f"{k}: {ours.get(k)!r} here, {theirs.get(k)!r} there" for k in keys if ours.get(k) != theirs.get(k)
    ]


def load_included(
    folder: str | Path,
    backbone: dict[str, Any],
    device: str,
    tasks: dict[str, dict[str, Any]],
    taken: dict[str, str],
) -> IncludedRun:
    """The cells of the comparison in `folder` (its output folder or its results.json) that fit this run: its
    `backbone` identity, `device` and `tasks` settings blocks (`run._task_settings`). `taken` maps each method
    already on the board to where it came from; a method of `folder` among them is refused. Raises
    `FeatliftError` naming the file and the mismatch."""
    path, results = _read_results(folder)
    theirs = results["settings"]
    for name, ours in (("backbone", backbone), ("device", device)):
        if theirs.get(name) != ours:
            raise FeatliftError(
                f"--include {path}: its {name} is {theirs.get(name)!r}, this run's is {ours!r}; "
                "cells of another backbone or device do not belong on this leaderboard"
            )
    shared_tasks = [t for t in tasks if t in theirs.get("tasks", {})]
    for task in shared_tasks:
        diff = _differences(tasks[task], theirs["tasks"][task], PATH_FIELDS)
        if diff:
            raise FeatliftError(
                f"--include {path}: task {task} ran with other settings there ({'; '.join(diff)}); "
                "rerun it with the same --set values or leave it out"
            )
    included = IncludedRun(source=path, methods=[], cells=[])
    for entry in results["methods"]:
        method = entry["method"]
        if method in taken:
            raise FeatliftError(
                f"--include {path}: method {method} is in {taken[method]} too; give it in one place only"
            )
        if entry.get("parameters") is not None:
            included.parameters[method] = int(entry["parameters"])
        if entry.get("training"):
            included.training[method] = entry["training"]
    for row in results["cells"]:
        if row["task"] not in shared_tasks:
            continue
        result = {
            "metrics": row["metrics"],
            "details": row.get("details", {}),
            "ms_per_image": row["ms_per_image"],
            "peak_memory_mib": row["peak_memory_mib"],
        }
        included.cells.append(
            Cell(
                row["method"],
                row["task"],
                row["metric"],
                result,
                row["cell"],
                True,
                row["cell_seconds"],
                row.get("environment", {}),
            )
        )
        if row["method"] not in included.methods:
            included.methods.append(row["method"])
    included.data = {t: theirs["tasks"][t].get("data") for t in shared_tasks}
    return included
