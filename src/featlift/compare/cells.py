"""A cell of the leaderboard is one method on one task. Its key is a hash of everything that determines its result:

- the method: its spec as given, and the fingerprint of the checkpoint it runs with (`methods.checkpoint_fingerprint`:
  the weights' SHA-256 and stored arguments), so a retrained or replaced checkpoint is evaluated again;
  the options every method gets (``--max-memory``);
- the task: its name, protocol, revision (bumped when the task's metric code changes) and every field of its config
  (dataset root, base size, sequences, limits, seeds, ...);
- the backbone: name, weights fingerprint, layer, facet;
- the device it ran on (the cost columns are the device's).

Not in the key: featlift's version (a release that leaves a task's metric code alone keeps its cells; a task's
``revision`` says when it does not), the output folder, and the training images and budget (they reach the key
through the checkpoint they trained).

The cache is ``DIR/cells/<task>/<method>-<hash>.json``, each written atomically once the cell is done, so a
killed run leaves only complete cells and a rerun computes the others.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..environment import environment
from ..evaluate.report import VariantResult
from ..fileio import remove_stale_temp_files, save_json_atomic

CELL_FORMAT = 1


def cell_key(
    method: str,
    checkpoint_fingerprint: str | None,
    method_defaults: dict[str, Any],
    task: str,
    protocol: str,
    revision: int,
    task_settings: dict[str, Any],
    backbone: dict[str, Any],
    device: str,
) -> dict[str, Any]:
    """Everything that determines a cell's result, as JSON-ready values."""
    return {
        "cell_format": CELL_FORMAT,
        "method": method,
        "checkpoint_fingerprint": checkpoint_fingerprint,
        "method_defaults": method_defaults,
        "task": task,
        "protocol": protocol,
        "task_revision": revision,
        "task_settings": task_settings,
        "backbone": backbone,
        "device": device,
    }


def key_hash(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text)[:60]


class CellCache:
    """The finished cells under ``DIR/cells``: `load` a cell by its key, `store` a finished one."""

    def __init__(self, out_dir: str | Path):
        self.folder = Path(out_dir) / "cells"
        self.folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(self.folder, recursive=True)

    def path(self, key: dict[str, Any]) -> Path:
        return self.folder / _slug(key["task"]) / f"{_slug(key['method'])}-{key_hash(key)}.json"

    def load(self, key: dict[str, Any]) -> dict[str, Any] | None:
        """The stored cell of `key`, or None (none yet, or one that cannot be read: it is computed again)."""
        path = self.path(key)
        try:
            cell = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return cell if cell.get("key") == json.loads(json.dumps(key, default=str)) else None

    def store(
        self,
        key: dict[str, Any],
        row: VariantResult,
        settings: dict[str, Any],
        seconds: float,
        parameters: int,
    ) -> dict[str, Any]:
        """Write a finished cell: its task's result row, the task's settings block, its wall seconds, the
        method's parameter count and the machine's state when it finished (`environment`: threads, load average,
        date; the context its ms per image were measured in)."""
        cell = {
            "key": key,
            "hash": key_hash(key),
            "result": asdict(row),
            "parameters": parameters,
            "task_settings": settings,
            "cell_seconds": round(seconds, 3),
            "environment": environment(key["device"]),
        }
        save_json_atomic(json.loads(json.dumps(cell, default=str)), self.path(key))
        return cell
