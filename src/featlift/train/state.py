"""The resumable training state in RUN_DIR: ``train_state.pt`` (model + optimizer + history), written atomically."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..errors import FeatliftError
from ..fileio import atomic_path

STATE_FILE = "train_state.pt"

# Settings that must not change between a run and its resumption (anything else, e.g. --epochs, may).
RESUME_KEYS = (
    "backbone",
    "fingerprint",
    "layer",
    "facet",
    "upsampler",
    "upsampler_args",
    "image_size",
    "batch_size",
    "lr",
    "loss",
    "augment",
    "seed",
    "val_fraction",
    "train_digests",
)


def save_state(run_dir: str | os.PathLike, state: dict[str, Any]) -> Path:
    path = Path(run_dir) / STATE_FILE
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def load_state(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(run_dir) / STATE_FILE
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise FeatliftError(
            f"{path}: cannot read the training state ({exc}); start a new run with another --out"
        ) from exc


def check_resumable(saved: dict[str, Any], current: dict[str, Any], path: str | os.PathLike) -> None:
    """Raise if the run in `path` was started with settings that differ from the current ones."""
    differing = [k for k in RESUME_KEYS if saved.get(k) != current.get(k)]
    if differing:
        detail = "; ".join(
            f"{k}: was {saved.get(k)!r}, now {current.get(k)!r}" for k in differing if k != "train_digests"
        )
        if "train_digests" in differing:
            detail = (detail + "; " if detail else "") + "the training images changed"
        raise FeatliftError(
            f"--resume: the run in {path} was started with other settings ({detail}); "
            "resume with the same arguments or start a new run with another --out"
        )
