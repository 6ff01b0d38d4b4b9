"""Named feature variants for side-by-side comparisons: ``none``, ``bilinear``, ``input-2x``, ``lift:CKPT:iters=2``.

Spec grammar: ``NAME[:CHECKPOINT][:key=value...]``

- ``none``: raw backbone tokens;
- ``input-Nx``: the backbone on the image resized N times larger (N a power of two), e.g. ``input-2x``;
- ``bilinear[:iters=K]``: bilinear upsampling by ``2**K``;
- ``lift[:CKPT][:iters=K]`` (or any registered trainable upsampler): without ``CKPT``, the checkpoint
  featlift ships for the backbone.

Callers load each image at ``variant.input_size(base)`` and call ``variant(images)``; so ``input-2x``
sees real pixels from the original image, not an upsampled base image.
"""

from __future__ import annotations

import re

import torch

from .backbones import ViTBackbone
from .errors import FeatliftError
from .pipeline import FeaturePipeline, resolve_upsampler

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

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.pipeline(images)

    def __repr__(self) -> str:
        return f"FeatureVariant({self.spec!r})"


def parse_variant(spec: str, backbone: ViTBackbone) -> FeatureVariant:
    """Build the variant `spec` describes, for `backbone` (see the module docstring for the grammar)."""
    name, *rest = spec.split(":")
    options: dict[str, str] = {}
    checkpoint = None
    for part in rest:
        if "=" in part:
            key, value = part.split("=", 1)
            options[key.strip()] = value.strip()
        elif checkpoint is None and part:
            checkpoint = part
        else:
            raise FeatliftError(
                f"variant {spec!r}: unexpected part {part!r} (grammar: NAME[:CHECKPOINT][:iters=K])"
            )
    unknown = set(options) - {"iters"}
    if unknown:
        raise FeatliftError(f"variant {spec!r}: unknown option(s) {', '.join(sorted(unknown))}; known: iters")
    try:
        iters = int(options.get("iters", 1))
    except ValueError:
        raise FeatliftError(f"variant {spec!r}: iters must be an integer") from None
    if iters < 1:
        raise FeatliftError(f"variant {spec!r}: iters must be >= 1")

    scale = _INPUT_SCALE.match(name)
    if name == "none" or scale:
        if rest:
            raise FeatliftError(f"variant {spec!r}: {name} takes no checkpoint or options")
        factor = int(scale.group(1)) if scale else 1
        if factor < 1 or factor & (factor - 1):
            raise FeatliftError(
                f"variant {spec!r}: the input scale must be a power of two (input-2x, input-4x)"
            )
        return FeatureVariant(spec, FeaturePipeline(backbone), input_scale=factor)
    upsampler, used = resolve_upsampler(backbone, name, checkpoint)
    return FeatureVariant(
        spec, FeaturePipeline(backbone, upsampler, iters=iters, checkpoint=used), checkpoint=used
    )


def parse_variants(specs: list[str], backbone: ViTBackbone) -> list[FeatureVariant]:
    specs = [s for item in specs for s in item.split(",") if s]
    if len(set(specs)) != len(specs):
        raise FeatliftError(f"variants repeat: {specs}")
    return [parse_variant(spec, backbone) for spec in specs]
