"""The schema of a checkpoint's ``config.json``: each field's JSON type and range, checked before use.

`validate_checkpoint_json` raises `CheckpointError` with the path of the first bad field, e.g.
``config.json: backbone.layer must be an integer >= 0, got "11" (a string)``. The upsampler's
``args`` are checked against its constructor: the names it takes and the types it annotates; their
values (e.g. ``output_scale > 0``) are checked by the constructor itself when the module is built.
Unknown top-level fields are ignored (a later featlift may add some); unknown fields inside
``upsampler``, ``backbone`` and ``normalization`` are refused.
"""

from __future__ import annotations

import inspect
import json
import math
import re
import types
import typing
from typing import Any

from .backbones import FACETS
from .errors import CheckpointError, FeatliftError
from .upsamplers import get_upsampler_class

ANY_BACKBONE = "any"  # backbone.name of weights that serve every backbone: the only field then
SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")

_JSON_TYPE_NAMES = {
    dict: "an object",
    list: "a list",
    str: "a string",
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    type(None): "null",
}


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# what a field must be -> the test; the description is used in the error message
_KINDS: dict[str, typing.Callable[[Any], bool]] = {
    "an object": lambda v: isinstance(v, dict),
    "a string": lambda v: isinstance(v, str),
    "a non-empty string": lambda v: isinstance(v, str) and bool(v),
    "true or false": lambda v: isinstance(v, bool),
    "an integer": _is_integer,
    "an integer >= 0": lambda v: _is_integer(v) and v >= 0,
    "an integer >= 1": lambda v: _is_integer(v) and v >= 1,
    "a finite number": _is_number,
    "a list of 3 finite numbers": lambda v: isinstance(v, list) and len(v) == 3 and all(map(_is_number, v)),
    "a list of 3 finite numbers > 0": lambda v: (
        isinstance(v, list) and len(v) == 3 and all(_is_number(x) and x > 0 for x in v)
    ),
    f"one of {', '.join(FACETS)}": lambda v: v in FACETS,
    "a sha256 (64 lowercase hex digits)": lambda v: isinstance(v, str) and bool(SHA256_PATTERN.fullmatch(v)),
}

BACKBONE_FIELDS = {
    "name": "a non-empty string",
    "fingerprint": "a string",
    "layer": "an integer >= 0",
    "facet": f"one of {', '.join(FACETS)}",
    "channels": "an integer >= 1",
    "patch_size": "an integer >= 1",
    "num_prefix_tokens": "an integer >= 0",
}
BACKBONE_OPTIONAL = ("num_prefix_tokens",)
NORMALIZATION_FIELDS = {"mean": "a list of 3 finite numbers", "std": "a list of 3 finite numbers > 0"}
UPSAMPLER_FIELDS = {"name": "a non-empty string", "args": "an object"}
UPSAMPLER_OPTIONAL = ("args",)


def _shown(value: Any) -> str:
    """A field's value as JSON, shortened, with its JSON type: ``"11" (a string)``."""
    if value is None:
        return "null"
    text = json.dumps(value, allow_nan=True, default=repr)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({_JSON_TYPE_NAMES.get(type(value), type(value).__name__)})"


def _check(value: Any, kind: str, path: str, source: str) -> None:
    if not _KINDS[kind](value):
        raise CheckpointError(f"{source}: {path} must be {kind}, got {_shown(value)}")


def _check_object(
    data: Any, fields: dict[str, str], optional: tuple[str, ...], path: str, source: str
) -> None:
    """`data` is an object holding exactly the `fields` (each of its kind), the `optional` ones may be absent."""
    _check(data, "an object", path, source)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise CheckpointError(
            f"{source}: {path} has unknown field(s) {', '.join(unknown)} (expected {', '.join(fields)})"
        )
    for name, kind in fields.items():
        if name not in data:
            if name in optional:
                continue
            raise CheckpointError(f"{source}: {path}.{name} is missing (it must be {kind})")
        _check(data[name], kind, f"{path}.{name}", source)


def _annotation_kind(annotation: Any) -> tuple[str | None, bool]:
    """(the `_KINDS` entry a constructor annotation asks for or None if unchecked, whether null is allowed)."""
    simple = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string"}
    if annotation in simple:
        return simple[annotation], False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        nullable = len(members) < len(typing.get_args(annotation))
        if len(members) == 1 and members[0] in simple:
            return simple[members[0]], nullable
    return None, True


def check_upsampler_args(name: str, args: dict[str, Any], source: str) -> None:
    """`args` are arguments the constructor of upsampler `name` takes, each of the type it annotates."""
    try:
        cls = get_upsampler_class(name)
    except FeatliftError as exc:
        raise CheckpointError(f"{source}: upsampler.name: {exc}") from None
    parameters = {
        p.name: p
        for p in list(inspect.signature(cls.__init__).parameters.values())[1:]
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    unknown = sorted(set(args) - set(parameters))
    if unknown:
        raise CheckpointError(
            f"{source}: upsampler.args: {name} takes no argument(s) {', '.join(unknown)} "
            f"(it takes {', '.join(parameters) or 'none'})"
        )
    hints = typing.get_type_hints(cls.__init__)
    for parameter in parameters.values():
        path = f"upsampler.args.{parameter.name}"
        kind, nullable = _annotation_kind(hints.get(parameter.name, Any))
        if parameter.name not in args:
            if parameter.default is inspect.Parameter.empty:
                raise CheckpointError(f"{source}: {path} is missing ({name} needs it)")
            continue
        value = args[parameter.name]
        if kind is not None and not (nullable and value is None):
            _check(value, kind, path, source)


def validate_checkpoint_json(data: Any, source: str, format_version: int) -> None:
    """Raise `CheckpointError` naming the first field of a parsed ``config.json`` that breaks the schema
    of `format_version` (the only version this featlift reads)."""
    _check(data, "an object", "the top level", source)
    version = data.get("format_version")
    if not (_is_integer(version) and version == format_version):
        raise CheckpointError(
            f"{source}: format_version {version!r} is not supported (this featlift reads {format_version})"
        )
    for name in ("upsampler", "backbone", "normalization"):
        if name not in data:
            raise CheckpointError(f"{source}: {name} is missing")
    _check_object(data["upsampler"], UPSAMPLER_FIELDS, UPSAMPLER_OPTIONAL, "upsampler", source)
    check_upsampler_args(data["upsampler"]["name"], data["upsampler"].get("args", {}), source)
    if isinstance(data["backbone"], dict) and data["backbone"].get("name") == ANY_BACKBONE:
        _check_object(data["backbone"], {"name": "a non-empty string"}, (), "backbone", source)
    else:
        _check_object(data["backbone"], BACKBONE_FIELDS, BACKBONE_OPTIONAL, "backbone", source)
    _check_object(data["normalization"], NORMALIZATION_FIELDS, (), "normalization", source)
    if "training" in data:
        _check(data["training"], "an object", "training", source)
    if "weights_sha256" in data:
        _check(data["weights_sha256"], "a sha256 (64 lowercase hex digits)", "weights_sha256", source)
