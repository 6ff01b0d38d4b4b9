"""The resumable training state ``RUN_DIR/train_state.safetensors``: written atomically, read without pickle.

One safetensors file holds every tensor (``model/<name>`` for the upsampler's state dict,
``optimizer/<param>/<name>`` for the optimizer's per-parameter state, ``objective/<module>/<name>`` for the
state dicts of an objective's own modules, when it has any) and, in its metadata, one JSON
document with the rest (epoch, history, settings, commands, the optimizer's param groups and any
non-tensor per-parameter values). Reading it can therefore never run code, unlike the pickled
``train_state.pt`` of earlier featlift versions, which is refused unread.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ..errors import FeatliftError
from ..fileio import save_safetensors_atomic

STATE_FILE = "train_state.safetensors"
LEGACY_STATE_FILE = "train_state.pt"  # pickled by featlift before the safetensors state; never unpickled
STATE_FORMAT = 1
_META_KEY = "featlift_train_state"
_MODEL, _OPTIMIZER, _OBJECTIVE = "model/", "optimizer/", "objective/"

# Settings that must not change between a run and its resumption (anything else, e.g. --epochs, may).
RESUME_KEYS = (
    "backbone",
    "fingerprint",
    "layer",
    "facet",
    "upsampler",
    "objective",
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
# Settings that states saved before they were recorded hold implicitly: every run trained LiFT's objective
_IMPLIED_SETTINGS = {"objective": "lift"}
# What a state holds besides the model and optimizer tensors
_RECORD_KEYS = ("epoch", "history", "wall_time_s", "settings", "commands")


def save_state(run_dir: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write `state` (keys ``model``, ``optimizer``, `_RECORD_KEYS` and optionally ``objective_modules``: module
    name -> state dict) to `STATE_FILE` in `run_dir`."""
    tensors = {_MODEL + name: value for name, value in state["model"].items()}
    objective_modules = state.get("objective_modules") or {}
    for module, values in objective_modules.items():
        if "/" in module:
            raise ValueError(f"objective module name {module!r} must not contain '/'")
        for name, value in values.items():
            tensors[f"{_OBJECTIVE}{module}/{name}"] = value
    per_param: dict[str, dict[str, Any]] = {}
    for param, values in state["optimizer"]["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{_OPTIMIZER}{param}/{name}"] = value
            else:
                per_param.setdefault(str(param), {})[name] = value
    record = {key: state[key] for key in _RECORD_KEYS}
    record["format"] = STATE_FORMAT
    if objective_modules:  # absent for objectives without modules (LiFT): their states are as before
        record["objective_modules"] = sorted(objective_modules)
    record["optimizer"] = {"param_groups": state["optimizer"]["param_groups"], "values": per_param}
    path = Path(run_dir) / STATE_FILE
    save_safetensors_atomic(tensors, path, metadata={_META_KEY: json.dumps(record)})
    return path


def load_state(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The state `save_state` wrote in `run_dir`, or None when there is none. Never unpickles anything."""
    run_dir = Path(run_dir)
    legacy = run_dir / LEGACY_STATE_FILE
    path = run_dir / STATE_FILE
    if not path.is_file():
        if legacy.is_file():
            raise FeatliftError(
                f"{legacy}: a training state in the pickle format of older featlift versions, which is not "
                "loaded because unpickling a file can run arbitrary code; this run cannot be resumed (its "
                "model.safetensors + config.json still load as a checkpoint): start a new run with another "
                "--out, or pass --overwrite instead of --resume to replace it"
            )
        return None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        record = json.loads(metadata[_META_KEY])
        if record.get("format") != STATE_FORMAT:
            raise ValueError(f"format {record.get('format')!r}, expected {STATE_FORMAT}")
        missing = [key for key in (*_RECORD_KEYS, "optimizer") if key not in record]
        if missing:
            raise ValueError(f"no {', '.join(missing)}")
        return _assemble(record, tensors)
    except (SafetensorError, OSError, KeyError, ValueError, TypeError, AttributeError) as exc:
        detail = f"no {exc} metadata" if isinstance(exc, KeyError) else str(exc)
        raise FeatliftError(
            f"{path}: cannot read the training state ({detail}); start a new run with another --out"
        ) from exc


def _assemble(record: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    model = {name[len(_MODEL) :]: value for name, value in tensors.items() if name.startswith(_MODEL)}
    per_param: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith(_OPTIMIZER):
            param, key = name[len(_OPTIMIZER) :].split("/", 1)
            per_param.setdefault(int(param), {})[key] = value
    for param, values in record["optimizer"]["values"].items():
        per_param.setdefault(int(param), {}).update(values)
    state = {key: record[key] for key in _RECORD_KEYS}
    state["model"] = model
    modules: dict[str, dict[str, torch.Tensor]] = {name: {} for name in record.get("objective_modules", [])}
    for name, value in tensors.items():
        if name.startswith(_OBJECTIVE):
            module, key = name[len(_OBJECTIVE) :].split("/", 1)
            modules.setdefault(module, {})[key] = value
    state["objective_modules"] = modules
    state["optimizer"] = {"state": per_param, "param_groups": record["optimizer"]["param_groups"]}
    return state


def check_resumable(saved: dict[str, Any], current: dict[str, Any], path: str | os.PathLike) -> None:
    """Raise if the run in `path` was started with settings that differ from the current ones."""
    current = json.loads(json.dumps(current))  # as the state stores them (tuples become lists)
    saved = {**_IMPLIED_SETTINGS, **saved}
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
