"""Named feature variants for side-by-side comparisons: ``none``, ``bilinear``, ``input-2x``, ``lift:CKPT:iters=2``.

Spec grammar: ``NAME[:CHECKPOINT][:key=value...]``, for any registered upsampler ``NAME``:

- ``none``: raw backbone tokens; ``input-Nx``: the backbone on the image resized N times larger (N a
  power of two), e.g. ``input-2x``;
- any registered upsampler, e.g. ``bilinear``, ``lift``, ``lift:CKPT:iters=2``: ``CKPT`` is a checkpoint
  folder or ``hf-hub:ORG/NAME[@REV]`` (a trained method without one uses the checkpoint featlift ships for the
  backbone);
- ``size=HxW`` (or ``size=S``), for every variant: the output size of the features;
- every other ``key=value`` is an argument of the method's constructor that its class lists in
  ``options`` (LiFT's ``iters``), typed as the constructor annotates it.

Callers load each image at ``variant.input_size(base)`` and call ``variant(images)``; so ``input-2x``
sees real pixels from the original image, not an upsampled base image.
"""

from __future__ import annotations

import re
import typing
from typing import Any

import torch

from .backbones import Backbone
from .errors import FeatliftError
from .images import parse_size
from .pipeline import FeaturePipeline, SourceImages, resolve_upsampler
from .upsamplers import get_upsampler_class

GRAMMAR = "NAME[:CHECKPOINT][:key=value...]"

_INPUT_SCALE = re.compile(r"^input-(\d+)x$")


class FeatureVariant:
    """A labelled way to turn images into features; ``variant(images)`` on images in ``[0, 1]``."""

    def __init__(
        self, spec: str, pipeline: FeaturePipeline, input_scale: int = 1, checkpoint: str | None = None
    ):
        self.spec = spec
        self.label = spec
        self.pipeline = pipeline
        self.input_scale = input_scale
        self.checkpoint = checkpoint

    def input_size(self, base: tuple[int, int]) -> tuple[int, int]:
        return base[0] * self.input_scale, base[1] * self.input_scale

    def output_grid(self, base: tuple[int, int]) -> tuple[int, int]:
        return self.pipeline.output_grid(*self.input_size(base))

    def to(self, device: str | torch.device) -> FeatureVariant:
        self.pipeline.to(device)
        return self

    def parameter_count(self) -> int:
        up = self.pipeline.upsampler
        return sum(p.numel() for p in up.parameters()) if up is not None else 0

    def __call__(self, images: torch.Tensor, sources: SourceImages = None) -> torch.Tensor:
        """Features of `images`; `sources` (the images before resizing) go to the pipeline, for methods
        guided at high resolution."""
        return self.pipeline(images, sources)

    def __repr__(self) -> str:
        return f"FeatureVariant({self.spec!r})"


def implied_options(cls: type, defaults: dict[str, Any] | None) -> dict[str, Any]:
    """The entries of `defaults` (e.g. ``--max-memory``'s ``max_memory_mib``) that upsampler class `cls` takes."""
    return {key: value for key, value in (defaults or {}).items() if key in cls.options}


def split_spec(spec: str) -> tuple[str, str | None, dict[str, str]]:
    """``(name, checkpoint or None, {key: text value})`` of a variant `spec` (grammar `GRAMMAR`); a checkpoint
    ``hf-hub:ORG/NAME[@REV]`` keeps its own colon."""
    name, *rest = spec.split(":")
    for k, part in enumerate(rest[:-1]):
        if part == "hf-hub" and "=" not in rest[k + 1]:
            rest[k : k + 2] = [f"hf-hub:{rest[k + 1]}"]
            break
    text_options: dict[str, str] = {}
    checkpoint = None
    for part in rest:
        if "=" in part:
            key, value = (s.strip() for s in part.split("=", 1))
            if key in text_options:
                raise FeatliftError(f"variant {spec!r}: option {key} is given twice")
            text_options[key] = value
        elif checkpoint is None and part:
            checkpoint = part
        else:
            raise FeatliftError(f"variant {spec!r}: unexpected part {part!r} (grammar: {GRAMMAR})")
    return name, checkpoint, text_options


def parse_variant(spec: str, backbone: Backbone, defaults: dict[str, Any] | None = None) -> FeatureVariant:
    """Build the variant `spec` describes, for `backbone` (see the module docstring for the grammar).

    `defaults` are options for every method that takes them (e.g. a memory budget), under the spec's own.
    """
    name, checkpoint, text_options = split_spec(spec)
    output_size = None
    if "size" in text_options:
        try:
            output_size = parse_size(text_options.pop("size"))
        except FeatliftError as exc:
            raise FeatliftError(f"variant {spec!r}: {exc}") from None

    scale = _INPUT_SCALE.match(name)
    if name == "none" or scale:
        if checkpoint is not None or text_options:
            raise FeatliftError(f"variant {spec!r}: {name} takes no checkpoint or options other than size")
        factor = int(scale.group(1)) if scale else 1
        if factor < 1 or factor & (factor - 1):
            raise FeatliftError(
                f"variant {spec!r}: the input scale must be a power of two (input-2x, input-4x)"
            )
        return FeatureVariant(spec, FeaturePipeline(backbone, output_size=output_size), input_scale=factor)
    try:
        cls = get_upsampler_class(name)
    except FeatliftError as exc:
        raise FeatliftError(f"variant {spec!r}: {exc}; or none, input-Nx") from None
    options = implied_options(cls, defaults)
    options.update({key: option_value(cls, key, value, spec) for key, value in text_options.items()})
    upsampler, used = resolve_upsampler(backbone, name, checkpoint, options)
    return FeatureVariant(
        spec, FeaturePipeline(backbone, upsampler, output_size=output_size, checkpoint=used), checkpoint=used
    )


def option_value(cls: type, key: str, text: str, spec: str) -> Any:
    """The value of option ``key=text`` for upsampler class `cls`, typed as its constructor annotates it."""
    if key not in cls.options:
        known = ", ".join(["size", *cls.options])
        raise FeatliftError(f"variant {spec!r}: {cls.name} has no option {key!r}; its options: {known}")
    return typed_argument(cls, key, text, f"variant {spec!r}")


def parse_training_spec(spec: str, trainable: typing.Collection[str]) -> tuple[str, dict[str, Any]]:
    """``NAME[:key=value...]`` of ``featlift train --upsampler`` -> ``(NAME, constructor settings)``, each value
    typed as the constructor annotates it; e.g. ``fade:gating=false`` -> ``("fade", {"gating": False})``."""
    name, checkpoint, text_settings = split_spec(spec)
    where = f"--upsampler {spec!r}"
    if name not in trainable:
        raise FeatliftError(
            f"{where}: {name!r} is not a trainable upsampler; choose from {', '.join(trainable)}"
        )
    if checkpoint is not None:
        raise FeatliftError(
            f"{where}: unexpected part {checkpoint!r}; the grammar is NAME[:key=value...] (no checkpoint: "
            "continue a run with --resume)"
        )
    cls = get_upsampler_class(name)
    known = cls.setting_names()
    settings = {}
    for key, text in text_settings.items():
        if key not in known:
            hint = " (use --no-residual)" if key == "residual" else ""
            raise FeatliftError(
                f"{where}: {name} has no setting {key!r}{hint}; its settings: {', '.join(known) or 'none'}"
            )
        settings[key] = typed_argument(cls, key, text, where)
    return name, settings


def typed_argument(cls: type, key: str, text: str, where: str) -> Any:
    """``key=text`` for the constructor of upsampler class `cls`, typed as the constructor annotates `key`."""
    annotation = typing.get_type_hints(cls.__init__).get(key, str)
    members = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    if text.lower() == "none" and type(None) in typing.get_args(annotation):
        return None
    kind = members[0]
    try:
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return text.lower() in ("true", "1", "yes")
        if typing.get_origin(kind) is tuple or kind is tuple:
            return parse_size(text)
        return kind(text)
    except (ValueError, TypeError, FeatliftError):
        kind_name = getattr(kind, "__name__", str(kind))
        raise FeatliftError(f"{where}: {key}={text!r} is not a valid {kind_name}") from None


def parse_variants(
    specs: list[str], backbone: Backbone, defaults: dict[str, Any] | None = None
) -> list[FeatureVariant]:
    specs = [s for item in specs for s in item.split(",") if s]
    if len(set(specs)) != len(specs):
        raise FeatliftError(f"variants repeat: {specs}")
    return [parse_variant(spec, backbone, defaults) for spec in specs]
