"""Upsampler checkpoints: ``model.safetensors`` + ``config.json`` that is enough to rebuild the module.

``config.json`` (format version 1)::

    {
      "format_version": 1,
      "upsampler": {"name": "lift", "args": {"channels": 384, "patch_size": 14, "residual": true}},
      "backbone": {"name": "vit_small_patch14_dinov2.lvd142m", "fingerprint": "…", "layer": 11,
                   "facet": "token", "channels": 384, "patch_size": 14, "num_prefix_tokens": 1},
      "normalization": {"mean": [...], "std": [...]},
      "training": {...}
    }

An upsampler is specific to the feature distribution it was trained on, so loading it for another
backbone, layer, facet or channel count fails (`CheckpointMismatchError`); other weights for the same
backbone name (fingerprint mismatch) only warn.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .backbones import ViTBackbone
from .errors import CheckpointError, CheckpointMismatchError
from .fileio import save_json_atomic, save_safetensors_atomic
from .upsamplers import Upsampler, create_upsampler
from .upsamplers.lift import LiFT, convert_original_state_dict

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class BackboneSpec:
    """The features an upsampler was trained on."""

    name: str
    fingerprint: str
    layer: int
    facet: str
    channels: int
    patch_size: int
    num_prefix_tokens: int = 0

    @classmethod
    def of(cls, backbone: ViTBackbone) -> BackboneSpec:
        return cls(
            name=backbone.name,
            fingerprint=backbone.fingerprint(),
            layer=backbone.layer,
            facet=backbone.facet,
            channels=backbone.channels,
            patch_size=backbone.patch_size,
            num_prefix_tokens=backbone.num_prefix_tokens,
        )

    def describe(self) -> str:
        return f"backbone={self.name} layer={self.layer} facet={self.facet} channels={self.channels} patch={self.patch_size}"


@dataclass
class CheckpointConfig:
    upsampler: str
    upsampler_args: dict[str, Any]
    backbone: BackboneSpec
    normalization: dict[str, list[float]]
    training: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "upsampler": {"name": self.upsampler, "args": self.upsampler_args},
            "backbone": asdict(self.backbone),
            "normalization": self.normalization,
            "training": self.training,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str) -> CheckpointConfig:
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise CheckpointError(
                f"{source}: format_version {version!r} is not supported (this featlift reads {FORMAT_VERSION})"
            )
        try:
            return cls(
                upsampler=data["upsampler"]["name"],
                upsampler_args=dict(data["upsampler"].get("args", {})),
                backbone=BackboneSpec(**data["backbone"]),
                normalization=data["normalization"],
                training=data.get("training", {}),
                format_version=version,
            )
        except (KeyError, TypeError) as exc:
            raise CheckpointError(
                f"{source}: malformed checkpoint config ({type(exc).__name__}: {exc})"
            ) from exc


def resolve_checkpoint_dir(path: str | os.PathLike) -> Path:
    """Accept the checkpoint folder or either of its two files."""
    path = Path(path)
    if path.is_file() and path.name in (WEIGHTS_FILE, CONFIG_FILE):
        path = path.parent
    if not path.is_dir():
        raise CheckpointError(
            f"checkpoint {path}: no such folder (expected a folder with {WEIGHTS_FILE} and {CONFIG_FILE})"
        )
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        if not (path / name).is_file():
            raise CheckpointError(
                f"checkpoint {path}: {name} is missing (expected {WEIGHTS_FILE} and {CONFIG_FILE})"
            )
    return path


def read_checkpoint_config(path: str | os.PathLike) -> CheckpointConfig:
    directory = resolve_checkpoint_dir(path)
    config_path = directory / CONFIG_FILE
    try:
        data = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{config_path}: not valid JSON ({exc})") from exc
    return CheckpointConfig.from_json(data, str(config_path))


def check_compatible(trained: BackboneSpec, backbone: ViTBackbone, source: str = "checkpoint") -> None:
    """Raise if `backbone` gives other features than `trained`; warn if only its weights differ."""
    using = BackboneSpec.of(backbone)
    fields = ("name", "layer", "facet", "channels", "patch_size")
    differing = [f for f in fields if getattr(trained, f) != getattr(using, f)]
    if differing:
        raise CheckpointMismatchError(
            f"{source} was trained for {trained.describe()}, but you are using {using.describe()} "
            f"(differs in {', '.join(differing)}). An upsampler only works on the features it was trained on: "
            "pick the matching --backbone/--layer/--facet, or train one with `featlift train`."
        )
    if trained.fingerprint != using.fingerprint:
        warnings.warn(
            f"{source} was trained against {trained.name} weights with fingerprint {trained.fingerprint}, "
            f"but the loaded weights have fingerprint {using.fingerprint}; results may be worse",
            stacklevel=3,
        )


def save_checkpoint(
    directory: str | os.PathLike,
    upsampler: Upsampler,
    backbone: ViTBackbone | BackboneSpec,
    training: dict[str, Any] | None = None,
    normalization: dict[str, list[float]] | None = None,
) -> Path:
    """Write ``model.safetensors`` then ``config.json`` into `directory`, each atomically."""
    spec = backbone if isinstance(backbone, BackboneSpec) else BackboneSpec.of(backbone)
    if normalization is None:
        if isinstance(backbone, BackboneSpec):
            raise ValueError("normalization is required when saving with a BackboneSpec")
        normalization = backbone.normalization
    config = CheckpointConfig(
        upsampler=upsampler.name,
        upsampler_args=upsampler.config(),
        backbone=spec,
        normalization=normalization,
        training=training or {},
    )
    directory = Path(directory)
    state = {k: v for k, v in upsampler.state_dict().items()}
    save_safetensors_atomic(state, directory / WEIGHTS_FILE, metadata={"format_version": str(FORMAT_VERSION)})
    save_json_atomic(config.to_json(), directory / CONFIG_FILE)
    return directory


def load_checkpoint(
    path: str | os.PathLike, backbone: ViTBackbone | None = None, map_location: str | torch.device = "cpu"
) -> tuple[Upsampler, CheckpointConfig]:
    """Rebuild the upsampler of a checkpoint, strictly, in eval mode.

    With `backbone`, first check that it gives the features the checkpoint was trained on.
    """
    directory = resolve_checkpoint_dir(path)
    config = read_checkpoint_config(directory)
    if backbone is not None:
        check_compatible(config.backbone, backbone, source=f"checkpoint {directory}")
    module = create_upsampler(config.upsampler, **config.upsampler_args)
    try:
        state = load_file(str(directory / WEIGHTS_FILE), device=str(map_location))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{directory / WEIGHTS_FILE}: cannot read ({exc})") from exc
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{directory / WEIGHTS_FILE}: weights do not fit {config.upsampler}{config.upsampler_args}: {exc}"
        ) from exc
    return module.eval(), config


def import_original_lift(
    pth: str | os.PathLike, backbone: ViTBackbone, directory: str | os.PathLike
) -> tuple[LiFT, CheckpointConfig]:
    """Convert a checkpoint of the original LiFT code (a bare state dict) into featlift's format.

    The original files record nothing about their backbone, so `backbone` (with its layer and facet)
    must be the one the file was trained for; channel count and shapes are checked against it.
    """
    pth = Path(pth)
    try:
        state = torch.load(str(pth), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{pth}: no such file") from None
    except Exception as exc:
        raise CheckpointError(f"{pth}: cannot read as a torch state dict ({exc})") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{pth}: expected a LiFT state dict, found {type(state).__name__}")
    state = convert_original_state_dict(state)
    head = state.get("head.weight")
    if head is None:
        raise CheckpointError(
            f"{pth}: not a LiFT state dict (no outc.weight); keys start {sorted(state)[:5]}"
        )
    if head.shape[0] != backbone.channels:
        raise CheckpointMismatchError(
            f"{pth} outputs {head.shape[0]} channels, but {backbone.name} layer {backbone.layer} facet "
            f"{backbone.facet} gives {backbone.channels}"
        )
    module = LiFT(channels=backbone.channels, patch_size=backbone.patch_size, residual=False)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{pth}: does not fit the LiFT architecture: {exc}") from exc
    save_checkpoint(
        directory, module, backbone, training={"imported_from": str(pth), "source": "original LiFT code"}
    )
    return module.eval(), read_checkpoint_config(directory)
