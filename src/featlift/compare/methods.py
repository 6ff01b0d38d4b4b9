"""The methods of a comparison: each spec's checkpoint (given, shipped, or trained here), its fingerprint, and
training the trainable methods that have none (``--train-missing``), all with the same data and budget.

A method is a variant spec (`featlift.variants`): ``bilinear``, ``lift:iters=2``, ``jafar:CKPT``. A trained
method without a checkpoint uses the one featlift ships for the backbone; when there is none, ``--train-missing``
trains it with its own objective (``capabilities.objective``) into ``DIR/trained/<name>-<hash>/``, the hash over
the backbone's fingerprint, layer, facet, the training images and the budget, so another budget trains another
checkpoint and a rerun finds (and, when it was killed, resumes: `featlift.train.train` with ``resume=True``) its own.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..backbones import Backbone
from ..checkpoint import WEIGHTS_FILE, read_checkpoint_config, resolve_checkpoint_dir
from ..errors import FeatliftError
from ..pretrained import find_shipped_checkpoint
from ..train import TrainConfig, train
from ..upsamplers import get_upsampler_class
from ..variants import split_spec

logger = logging.getLogger(__name__)

# the TrainConfig fields a --budget may set, and their defaults in a comparison (those of `featlift train`)
BUDGET_FIELDS = {"epochs": 5, "image_size": 448, "batch_size": 8, "lr": 1e-3, "seed": 0, "val_fraction": 0.1}


def parse_budget(text: str | None) -> dict[str, Any]:
    """``"epochs=1,image_size=224"`` -> the full training budget, every other field at its default."""
    budget = dict(BUDGET_FIELDS)
    for part in [p.strip() for p in (text or "").split(",") if p.strip()]:
        key, sep, value = part.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in BUDGET_FIELDS:
            raise FeatliftError(
                f"--budget {text!r}: {part!r} is not KEY=VALUE with KEY one of {', '.join(BUDGET_FIELDS)}"
            )
        kind = type(BUDGET_FIELDS[key])
        try:
            number = kind(value)
        except ValueError:
            raise FeatliftError(
                f"--budget {text!r}: {key}={value!r} is not a valid {kind.__name__}"
            ) from None
        if (key in ("epochs", "image_size", "batch_size") and number < 1) or (key == "lr" and number <= 0):
            raise FeatliftError(f"--budget {text!r}: {key}={value!r} must be positive")
        if key == "val_fraction" and not 0 <= number < 1:
            raise FeatliftError(f"--budget {text!r}: val_fraction={value!r} must be in [0, 1)")
        budget[key] = number
    return budget


@dataclass
class Method:
    """One method of the comparison: the user's `spec`, the spec that is run (`run_spec`, with the
    checkpoint trained here when there was none), the checkpoint folder used and where it came from."""

    spec: str
    name: str
    run_spec: str
    checkpoint: str | None = None
    source: str = "none"  # none (nothing to train) | given | shipped | trained | missing
    problem: str | None = None  # why it cannot run (no checkpoint, training failed)
    training: dict[str, Any] = field(default_factory=dict)

    @property
    def trainable(self) -> bool:
        return self.source in ("given", "shipped", "trained", "missing")


def resolve_method(spec: str, backbone: Backbone) -> Method:
    """Find `spec`'s checkpoint without building anything; an unknown name raises `FeatliftError`."""
    name, checkpoint, _ = split_spec(spec)
    if name == "none" or re.fullmatch(r"input-\d+x", name):
        return Method(spec, name, spec)
    cls = get_upsampler_class(name)  # an unknown method is refused here, naming the known ones
    if not cls.trainable:
        return Method(spec, name, spec)
    if checkpoint is not None:
        return Method(spec, name, spec, checkpoint=checkpoint, source="given")
    shipped = find_shipped_checkpoint(backbone.name, backbone.layer, backbone.facet, name)
    if shipped is not None:
        return Method(spec, name, spec, checkpoint=str(shipped), source="shipped")
    problem = (
        f"{name} needs a checkpoint: featlift ships none for {backbone.name} layer {backbone.layer} facet "
        f"{backbone.facet}; give one ({name}:CKPT) or pass --train-missing"
    )
    return Method(spec, name, spec, source="missing", problem=problem)


def with_checkpoint(spec: str, checkpoint: str | Path) -> str:
    """`spec` with `checkpoint` put in place (the spec has none): ``lift:iters=2`` -> ``lift:CKPT:iters=2``."""
    name, _, rest = spec.partition(":")
    return f"{name}:{checkpoint}" + (f":{rest}" if rest else "")


def checkpoint_fingerprint(checkpoint: str | None) -> str | None:
    """What identifies a checkpoint's weights: the SHA-256 of ``model.safetensors`` its ``config.json``
    records (hashed here for checkpoints older than that record), with the stored constructor arguments."""
    if checkpoint is None:
        return None
    directory = resolve_checkpoint_dir(checkpoint)
    config = read_checkpoint_config(directory)
    weights = config.weights_sha256 or hashlib.sha256((directory / WEIGHTS_FILE).read_bytes()).hexdigest()
    payload = json.dumps({"weights": weights, "args": config.upsampler_args}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def training_cost(checkpoint: str | None) -> dict[str, Any]:
    """The cost a checkpoint's training records (epochs, images, image size, wall seconds), {} if none."""
    if checkpoint is None:
        return {}
    training = read_checkpoint_config(checkpoint).training or {}
    if "wall_time_s" not in training:
        return {}
    args = training.get("args", {})
    return {
        "epochs": training.get("epochs"),
        "train_images": training.get("train_images"),
        "image_size": args.get("image_size"),
        "wall_time_s": training.get("wall_time_s"),
        "objective": training.get("objective_name"),
    }


def training_folder(out_dir: Path, method: str, backbone: Backbone, images: str, budget: dict) -> Path:
    """``DIR/trained/<method>-<hash>``: one folder per (method, backbone features, training images, budget)."""
    payload = {
        "method": method,
        "backbone": [backbone.name, backbone.fingerprint(), backbone.layer, backbone.facet],
        "images": str(Path(images).resolve()),
        "budget": budget,
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]
    return out_dir / "trained" / f"{method}-{digest}"


def train_method(
    method: str,
    backbone: Backbone,
    images: str,
    budget: dict[str, Any],
    out_dir: Path,
    weights: str | None,
    device: str | None,
    progress: bool,
) -> Path:
    """Train `method` with its own objective on `images` for `budget` (or resume / reuse the run already in
    its folder); return the checkpoint folder."""
    folder = training_folder(out_dir, method, backbone, images, budget)
    config = TrainConfig(
        images=str(images),
        out=str(folder),
        backbone=backbone.name,
        weights=weights,
        layer=backbone.layer,
        facet=backbone.facet,
        upsampler=method,
        resume=True,  # a finished run is reused as it is, a killed one continues after its last epoch
        device=device,
        progress=progress,
        **budget,
    )
    config.command = f"featlift compare --train-missing ({config.describe()})"
    logger.info("training %s for %s into %s", method, backbone.name, folder)
    train(config, backbone=backbone)
    return folder
