"""Shared plumbing of the ``featlift eval`` tasks: variant arguments, image loading and cost accounting.

A task module typically does::

    def register(subparsers):
        parser = subparsers.add_parser("mytask", ...)
        add_eval_args(parser, default_size=(224, 224))
        parser.set_defaults(run=run)

    def run(args):
        device = resolve_device(args.device)
        backbone, variants = variants_from_args(args, device)
        rows = []
        for variant in variants:
            timer = FeatureTimer(variant, device)
            features = timer(load_batch(paths, variant.input_size(args.size)))   # timed, per image
            rows.append(timer.result({"metric": value}))
        write_results(args.out, "mytask", rows, eval_settings(args, backbone, variants, extra=...))
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from typing import Any

import torch

from ..backbones import ViTBackbone
from ..errors import FeatliftError
from ..images import image_to_tensor, load_image
from ..meters import peak_memory_mib, timed_call
from ..pretrained import find_shipped_checkpoint
from ..variants import FeatureVariant, parse_variants
from .report import VariantResult

logger = logging.getLogger(__name__)

BASE_VARIANTS = ("none", "bilinear", "input-2x")


def add_eval_args(parser: argparse.ArgumentParser, default_size: tuple[int, int] | None = (224, 224)) -> None:
    """Add the arguments every eval task shares: backbone, ``--variant``, ``--size``, ``--device``, ``--out``."""
    from ..commands.common import add_backbone_args, add_device_arg, add_variant_arg, size_arg

    add_backbone_args(parser)
    add_variant_arg(
        parser, "none, bilinear, input-2x, plus lift when featlift ships a checkpoint for the backbone"
    )
    size_help = "base input size S or HxW in pixels, a multiple of the patch size"
    if default_size is not None:
        size_help += f" (default {default_size[0]}x{default_size[1]})"
    parser.add_argument("--size", type=size_arg, default=default_size, help=size_help)
    add_device_arg(parser)
    parser.add_argument("--out", default=None, help="write results.json and results.md into this folder")


def default_variant_specs(backbone: ViTBackbone) -> list[str]:
    """none, bilinear, input-2x, and lift when a shipped checkpoint fits the backbone."""
    specs = list(BASE_VARIANTS)
    if find_shipped_checkpoint(backbone.name, backbone.layer, backbone.facet, "lift") is not None:
        specs.append("lift")
    return specs


def variants_from_args(
    args: argparse.Namespace, device: torch.device | str = "cpu"
) -> tuple[ViTBackbone, list[FeatureVariant]]:
    """Build the backbone from the backbone args and the variants of ``--variant`` (or the defaults), on `device`.

    Each variant runs with featlift's default inference transforms (BN folding, channels-last), as
    ``featlift extract`` does, so its cost is what a user pays; its outputs are unchanged (to ~1e-6).
    """
    from ..commands.common import backbone_from_args
    from ..speedups import optimize_pipeline

    backbone = backbone_from_args(args)
    specs = args.variant or default_variant_specs(backbone)
    variants = parse_variants(specs, backbone)
    for variant in variants:
        variant.pipeline = optimize_pipeline(variant.pipeline)
        variant.to(device)
    return backbone, variants


def check_sizes(variants: Sequence[FeatureVariant], base: tuple[int, int]) -> None:
    """Fail early (with a suggestion) when a variant's input size is not a multiple of the patch size."""
    for variant in variants:
        variant.output_grid(base)


def load_image_tensor(path: str | os.PathLike, size: tuple[int, int] | None) -> torch.Tensor:
    """One image file -> ``[3, H, W]`` in ``[0, 1]`` at `size` (bicubic, aspect ratio ignored)."""
    return image_to_tensor(load_image(path), size)


def load_batch(paths: Sequence[str | os.PathLike], size: tuple[int, int]) -> torch.Tensor:
    """Image files -> ``[B, 3, H, W]`` in ``[0, 1]``, each resized to `size` (H, W) with bicubic filtering."""
    return torch.stack([load_image_tensor(p, size) for p in paths])


class FeatureTimer:
    """Runs a variant on batches and accumulates the time and peak memory of the feature computation only.

    ``timer(images)`` -> features on the timer's device; ``timer.ms_per_image`` averages over every image seen,
    ``timer.peak_memory_mib`` is the largest peak of one call (`featlift.meters.peak_memory_mib`: CUDA max
    allocated, on CPU the live tensors the call creates). Memory is measured in an extra, untimed call on the
    first batch of each shape, so the timed calls run without the tracker. The first call of a variant pays
    one-off costs (allocator warm-up, lazy init); call ``warmup(images)`` first to exclude them.
    """

    def __init__(self, variant: FeatureVariant, device: torch.device | str = "cpu"):
        self.variant = variant
        self.device = torch.device(device)
        self.seconds = 0.0
        self.images = 0
        self.peak_memory_mib = 0.0
        self._measured_shapes: set[tuple[int, ...]] = set()

    def warmup(self, images: torch.Tensor) -> None:
        """One untimed forward pass on (a slice of) `images`."""
        self.variant(images[:1].to(self.device))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device)
        if tuple(images.shape) not in self._measured_shapes:
            self._measured_shapes.add(tuple(images.shape))
            self.peak_memory_mib = max(
                self.peak_memory_mib, peak_memory_mib(lambda: self.variant(images), self.device)
            )
        features, seconds = timed_call(lambda: self.variant(images), self.device)
        self.seconds += seconds
        self.images += images.shape[0]
        return features

    @property
    def ms_per_image(self) -> float:
        return 1000.0 * self.seconds / self.images if self.images else float("nan")

    def result(self, metrics: dict[str, float], details: dict[str, Any] | None = None) -> VariantResult:
        """A report row with these metrics and the accumulated cost."""
        return VariantResult(
            variant=self.variant.label,
            metrics={k: float(v) for k, v in metrics.items()},
            ms_per_image=self.ms_per_image,
            peak_memory_mib=self.peak_memory_mib,
            details=details or {},
        )


def eval_settings(
    args: argparse.Namespace, backbone: ViTBackbone, variants: Sequence[FeatureVariant], **extra: Any
) -> dict[str, Any]:
    """The settings block of results.json: backbone, variants (with checkpoints and grids), size, device, extras."""
    base = tuple(args.size) if getattr(args, "size", None) is not None else None
    settings: dict[str, Any] = {
        "backbone": backbone.name,
        "weights": getattr(args, "weights", None) or os.environ.get("FEATLIFT_WEIGHTS"),
        "layer": backbone.layer,
        "facet": backbone.facet,
        "base_size": list(base) if base else None,
        "device": str(getattr(args, "device", None) or ("cuda" if torch.cuda.is_available() else "cpu")),
        "variants": [
            {
                "spec": v.spec,
                "checkpoint": v.checkpoint,
                "input_size": list(v.input_size(base)) if base else None,
                "feature_grid": list(v.output_grid(base)) if base else None,
            }
            for v in variants
        ],
    }
    settings.update(extra)
    return settings


def require_path(path: str | os.PathLike, layout: str, kind: str = "file") -> None:
    """Raise `FeatliftError` naming `path` and the expected `layout` when the file/folder is missing."""
    from pathlib import Path

    path = Path(path)
    ok = path.is_dir() if kind == "folder" else path.is_file()
    if not ok:
        raise FeatliftError(f"{path}: no such {kind}; expected layout: {layout}")
