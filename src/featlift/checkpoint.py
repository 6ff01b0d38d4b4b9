"""Upsampler checkpoints: ``model.safetensors`` + ``config.json`` that is enough to rebuild the module.

``config.json`` (format version 1)::

    {
      "format_version": 1,
      "upsampler": {"name": "lift", "args": {"channels": 384, "patch_size": 14, "residual": true}},
      "backbone": {"name": "vit_small_patch14_dinov2.lvd142m", "fingerprint": "…", "layer": 11,
                   "facet": "token", "channels": 384, "patch_size": 14, "num_prefix_tokens": 1},
    (or "backbone": {"name": "any"} for weights that serve every backbone, e.g. AnyUp's official ones;
    an upsampler trained on several layers concatenated also has "layers": [3, 6, 9, 11], with "layer"
    the deepest of them and "channels" their sum; a checkpoint with one layer has no "layers")
      "normalization": {"mean": [...], "std": [...]},
      "weights_sha256": "…",
      "training": {...}
    }

``config.json`` is checked against its schema (`checkpoint_schema`) before use. It is written after
``model.safetensors`` and records that file's SHA-256, so a pair from two different saves (a save
killed between its two writes) is refused on load; a config without the hash (written before featlift
recorded it) loads with a warning. Non-finite weights are refused on load and on save.

An upsampler is specific to the feature distribution it was trained on, so loading it for another
backbone, layer, facet or channel count fails (`CheckpointMismatchError`); other weights for the same
backbone name (fingerprint mismatch) only warn, and an empty fingerprint (imported weights whose backbone
weights featlift never saw) is not compared. A method that declares ``capabilities.backbones == "any"``
only warns on another backbone, and a checkpoint for backbone ``"any"`` loads for every backbone.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes

from .backbones import Backbone
from .checkpoint_schema import ANY_BACKBONE, validate_checkpoint_json
from .errors import CheckpointError, CheckpointMismatchError
from .fileio import save_json_atomic, save_safetensors_atomic
from .upsamplers import Upsampler, create_upsampler, get_upsampler_class
from .weightfiles import refuse_non_finite

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class BackboneSpec:
    """The features an upsampler was trained on.

    `layers` is None for one layer (`layer`), else every tapped layer in order (`layer` is the deepest).
    """

    name: str
    fingerprint: str
    layer: int
    facet: str
    channels: int
    patch_size: int
    num_prefix_tokens: int = 0
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.layers is not None:
            layers = tuple(self.layers)
            object.__setattr__(self, "layers", None if layers == (self.layer,) else layers)

    @classmethod
    def of(cls, backbone: Backbone) -> BackboneSpec:
        layers = tuple(getattr(backbone, "layers", (backbone.layer,)))
        return cls(
            name=backbone.name,
            fingerprint=backbone.fingerprint(),
            layer=backbone.layer,
            facet=backbone.facet,
            channels=backbone.channels,
            patch_size=backbone.patch_size,
            num_prefix_tokens=backbone.num_prefix_tokens,
            layers=layers if len(layers) > 1 else None,
        )

    @classmethod
    def any(cls) -> BackboneSpec:
        """Weights that serve the features of every backbone (``config.json``: ``{"name": "any"}``)."""
        return cls(name=ANY_BACKBONE, fingerprint="", layer=0, facet="token", channels=0, patch_size=0)

    @property
    def is_any(self) -> bool:
        return self.name == ANY_BACKBONE

    @property
    def tapped_layers(self) -> tuple[int, ...]:
        """Every layer the features come from: ``(layer,)`` for one."""
        return self.layers if self.layers is not None else (self.layer,)

    @property
    def layer_label(self) -> str:
        return ",".join(map(str, self.tapped_layers))

    def to_json(self) -> dict[str, Any]:
        if self.is_any:
            return {"name": ANY_BACKBONE}
        data = asdict(self)
        if self.layers is None:
            del data["layers"]  # one layer: the format written before several layers existed
        else:
            data["layers"] = list(self.layers)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str) -> BackboneSpec:
        """From a schema-checked ``backbone`` object, its ``layers`` (if any) checked here."""
        data = dict(data)
        layers = data.pop("layers", None)
        if layers is not None:
            _check_layers(layers, data.get("layer"), source)
            layers = tuple(layers)
        return cls(**data, layers=layers)

    def describe(self) -> str:
        if self.is_any:
            return "backbone=any (feature-agnostic weights)"
        return (
            f"backbone={self.name} layer={self.layer_label} facet={self.facet} channels={self.channels} "
            f"patch={self.patch_size}"
        )


def _check_layers(layers: Any, layer: Any, source: str) -> None:
    """``backbone.layers``: a list of at least 2 increasing integers >= 0 that ends with ``backbone.layer``."""
    ok = (
        isinstance(layers, list)
        and len(layers) >= 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in layers)
        and all(b > a for a, b in zip(layers, layers[1:], strict=False))
    )
    if not ok:
        raise CheckpointError(
            f"{source}: backbone.layers must be a list of at least 2 increasing integers >= 0, "
            f"got {json.dumps(layers)[:60]}"
        )
    if layers[-1] != layer:
        raise CheckpointError(
            f"{source}: backbone.layers {json.dumps(layers)} must end with backbone.layer (the deepest), got {layer}"
        )


def _schema_view(data: Any) -> Any:
    """`data` as `checkpoint_schema` knows it: ``backbone.layers`` (checked by `_check_layers`) left out."""
    if isinstance(data, dict) and isinstance(data.get("backbone"), dict) and "layers" in data["backbone"]:
        backbone = {k: v for k, v in data["backbone"].items() if k != "layers"}
        return {**data, "backbone": backbone}
    return data


@dataclass
class CheckpointConfig:
    upsampler: str
    upsampler_args: dict[str, Any]
    backbone: BackboneSpec
    normalization: dict[str, list[float]]
    training: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    # SHA-256 of model.safetensors; None in checkpoints saved before featlift recorded it
    weights_sha256: str | None = None

    def to_json(self) -> dict[str, Any]:
        data = {
            "format_version": self.format_version,
            "upsampler": {"name": self.upsampler, "args": self.upsampler_args},
            "backbone": self.backbone.to_json(),
            "normalization": self.normalization,
        }
        if self.weights_sha256 is not None:
            data["weights_sha256"] = self.weights_sha256
        data["training"] = self.training
        return data

    @classmethod
    def from_json(cls, data: Any, source: str) -> CheckpointConfig:
        """Build from parsed ``config.json`` after checking it against the schema (`CheckpointError` if not)."""
        validate_checkpoint_json(_schema_view(data), source, FORMAT_VERSION)
        return cls(
            upsampler=data["upsampler"]["name"],
            upsampler_args=dict(data["upsampler"].get("args", {})),
            backbone=(
                BackboneSpec.any()
                if data["backbone"]["name"] == ANY_BACKBONE
                else BackboneSpec.from_json(data["backbone"], source)
            ),
            normalization=data["normalization"],
            training=data.get("training", {}),
            format_version=data["format_version"],
            weights_sha256=data.get("weights_sha256"),
        )

    def build_upsampler(self, source: str, options: dict[str, Any] | None = None) -> Upsampler:
        """A fresh module from ``upsampler`` and ``args`` (`options` over them); values its constructor
        refuses raise `CheckpointError`."""
        return _build(self.upsampler, {**self.upsampler_args, **(options or {})}, source)


def _build(name: str, args: dict[str, Any], source: str) -> Upsampler:
    try:
        return create_upsampler(name, **args)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{source}: upsampler.args {json.dumps(args)}: {exc}") from exc


def check_buildable(name: str, args: dict[str, Any], source: str) -> None:
    """Raise `CheckpointError` if upsampler `name` refuses `args`, as `load_checkpoint` would.

    The module is built on the meta device (no memory, no initialisation work) with the global random
    state saved and restored, so checking a config before a save changes nothing else.
    """
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        _build(name, args, source)


def resolve_checkpoint_dir(path: str | os.PathLike) -> Path:
    """Accept the checkpoint folder, either of its two files, or ``hf-hub:ORG/NAME[@REVISION]``.

    A hub reference is downloaded into (or found in) the Hugging Face cache and verified (`featlift.hub`);
    its snapshot folder is returned.
    """
    if isinstance(path, str) and path.startswith("hf-hub:"):
        from .hub import download_checkpoint  # hub imports this module

        return download_checkpoint(path)
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


def check_compatible(
    trained: BackboneSpec, backbone: Backbone, source: str = "checkpoint", any_backbone: bool = False
) -> None:
    """Raise if `backbone` gives other features than `trained`; warn if only its weights differ.

    `trained` for backbone "any" fits every backbone; with `any_backbone` (a method whose weights serve every
    backbone) another backbone only warns.
    """
    if trained.is_any:
        return
    using = BackboneSpec.of(backbone)
    fields = ("name", "tapped_layers", "facet", "channels", "patch_size")
    differing = [f.replace("tapped_", "") for f in fields if getattr(trained, f) != getattr(using, f)]
    if differing and any_backbone:
        warnings.warn(
            f"{source} was trained for {trained.describe()}; you are using {using.describe()}. The method is "
            "designed for any backbone, but results may be worse than on the features it was trained on",
            stacklevel=3,
        )
        return
    if differing:
        raise CheckpointMismatchError(
            f"{source} was trained for {trained.describe()}, but you are using {using.describe()} "
            f"(differs in {', '.join(differing)}). An upsampler only works on the features it was trained on: "
            "pick the matching --backbone/--layer/--facet, or train one with `featlift train`."
        )
    if trained.fingerprint and trained.fingerprint != using.fingerprint:
        warnings.warn(
            f"{source} was trained against {trained.name} weights with fingerprint {trained.fingerprint}, "
            f"but the loaded weights have fingerprint {using.fingerprint}; results may be worse",
            stacklevel=3,
        )


def save_checkpoint(
    directory: str | os.PathLike,
    upsampler: Upsampler,
    backbone: Backbone | BackboneSpec,
    training: dict[str, Any] | None = None,
    normalization: dict[str, list[float]] | None = None,
) -> Path:
    """Write ``model.safetensors`` then ``config.json`` (with the weights' SHA-256) into `directory`, each atomically.

    Refuses (`CheckpointError`, nothing written) weights with NaN or inf, and a config that would not load.
    """
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
    source = f"cannot save checkpoint {directory}"
    validate_checkpoint_json(_schema_view(config.to_json()), source, FORMAT_VERSION)
    check_buildable(config.upsampler, config.upsampler_args, source)  # what is saved must load
    state = {k: v for k, v in upsampler.state_dict().items()}
    refuse_non_finite(state, source, CheckpointError)
    config.weights_sha256 = save_safetensors_atomic(
        state, directory / WEIGHTS_FILE, metadata={"format_version": str(FORMAT_VERSION)}
    )
    save_json_atomic(config.to_json(), directory / CONFIG_FILE)  # last: it vouches for the weights file
    return directory


def load_checkpoint(
    path: str | os.PathLike,
    backbone: Backbone | None = None,
    map_location: str | torch.device = "cpu",
    options: dict[str, Any] | None = None,
) -> tuple[Upsampler, CheckpointConfig]:
    """Rebuild the upsampler of a checkpoint, strictly, in eval mode.

    `path` is a checkpoint folder (or one of its files) or ``hf-hub:ORG/NAME[@REVISION]`` (downloaded,
    cached and verified, see `featlift.hub`; ``HF_HUB_OFFLINE=1`` reads the cache only). With `backbone`, first
    check that it gives the features the checkpoint was trained on. `options` are constructor arguments that
    apply over the stored ones (e.g. LiFT's ``iters``).
    """
    directory = resolve_checkpoint_dir(path)
    config = read_checkpoint_config(directory)
    options = dict(options or {})
    agnostic = get_upsampler_class(config.upsampler).capabilities.backbones == "any"
    if backbone is not None and agnostic and "patch_size" in config.upsampler_args:
        options.setdefault("patch_size", backbone.patch_size)  # weights for any backbone: sizes follow it
    module = config.build_upsampler(str(directory / CONFIG_FILE), options)
    if backbone is not None:
        check_compatible(config.backbone, backbone, source=f"checkpoint {directory}", any_backbone=agnostic)
    weights_path = directory / WEIGHTS_FILE
    try:
        payload = weights_path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{weights_path}: cannot read ({exc.strerror or exc})") from exc
    check_weights_hash(config, hashlib.sha256(payload).hexdigest(), directory)
    try:
        state = load_safetensors_bytes(payload)
    except SafetensorError as exc:
        raise CheckpointError(f"{weights_path}: cannot read ({exc})") from exc
    refuse_non_finite(state, str(weights_path), CheckpointError)
    if torch.device(map_location).type != "cpu":
        state = {k: v.to(map_location) for k, v in state.items()}
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{weights_path}: weights do not fit {config.upsampler}{config.upsampler_args}: {exc}"
        ) from exc
    return module.eval(), config


def check_weights_hash(config: CheckpointConfig, actual: str, directory: Path) -> None:
    """Refuse a ``model.safetensors`` that is not the one its ``config.json`` was written with."""
    if config.weights_sha256 is None:
        warnings.warn(
            f"checkpoint {directory}: {CONFIG_FILE} records no weights_sha256 (saved by an older featlift), so "
            f"featlift cannot check that {WEIGHTS_FILE} is from the same save; save it again to record one",
            stacklevel=3,
        )
    elif config.weights_sha256 != actual:
        raise CheckpointError(
            f"checkpoint {directory}: {WEIGHTS_FILE} (sha256 {actual[:16]}...) is not the file its {CONFIG_FILE} "
            f"was written with (weights_sha256 {config.weights_sha256[:16]}...): the two files come from "
            "different saves (e.g. a save killed between its two writes). Save the checkpoint again, or restore "
            "both files together"
        )
