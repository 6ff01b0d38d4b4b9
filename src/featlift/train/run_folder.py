"""The run folder ``--out``: what a new, resumed or overwriting run accepts to find there, and tidying up.

A new run never silently replaces what an earlier run (or a copied checkpoint) left in RUN_DIR: it
needs ``--resume`` to continue a training run or ``--overwrite`` to replace it. These checks only
look at which files exist; nothing is read. A run that fails removes the folders it created if they
are still empty (e.g. ``RUN_DIR`` and ``RUN_DIR/cache`` after a bad argument).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..checkpoint import CONFIG_FILE, WEIGHTS_FILE
from ..errors import FeatliftError
from .state import LEGACY_STATE_FILE, STATE_FILE

LOG_FILE = "train_log.jsonl"
CHECKPOINT_FILES = (WEIGHTS_FILE, CONFIG_FILE)
STATE_FILES = (STATE_FILE, LEGACY_STATE_FILE)
RUN_FILES = (*STATE_FILES, *CHECKPOINT_FILES, LOG_FILE)  # everything a run writes in RUN_DIR except the cache


def check_run_folder(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Raise unless a run with these flags may write into `run_dir` as it is now."""
    if resume and overwrite:
        raise FeatliftError("--resume and --overwrite: pass one of them (continue the run, or replace it)")
    found = [name for name in RUN_FILES if (run_dir / name).exists()]
    if overwrite or not found:
        return
    has_state = any(name in STATE_FILES for name in found)
    checkpoint = [name for name in found if name in CHECKPOINT_FILES]
    if resume:
        if checkpoint and not has_state:
            raise FeatliftError(
                f"--resume: {run_dir} holds a checkpoint ({', '.join(checkpoint)}) but no training state "
                f"({STATE_FILE}) to continue from; pass --overwrite to replace it with a new run, or choose "
                "another --out"
            )
        return  # a state to continue, or only the log of a run stopped in its first epoch: start it again
    if has_state:
        raise FeatliftError(
            f"--out {run_dir}: already holds a training run ({', '.join(found)}); pass --resume to continue "
            "it, --overwrite to replace it, or choose another --out"
        )
    raise FeatliftError(
        f"--out {run_dir}: already holds {', '.join(found)}, which a new run would overwrite; pass "
        "--overwrite to replace them, or choose another --out"
    )


def clear_run_folder(run_dir: Path) -> None:
    """Delete the files of the run `--overwrite` replaces (the feature cache is kept: it stays valid)."""
    for name in RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)


def missing_folders(path: str | os.PathLike) -> list[Path]:
    """`path` and those of its parents that do not exist yet, deepest first."""
    missing = []
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def remove_if_empty(folders: list[Path]) -> None:
    """Remove each folder (deepest first) if it holds nothing but empty folders; keep anything with a file."""
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        if not folder.is_dir():
            continue
        for below, _, _ in os.walk(folder, topdown=False):
            try:
                os.rmdir(below)
            except OSError:  # not empty (or gone): keep it
                pass
