"""Shared plumbing of the evaluation tasks: building the variants, image loading, cost accounting, settings.

A task function typically does::

    def evaluate_mytask(config, variants, device="cpu", weights=None, on_result=None) -> TaskResults:
        check_sizes(variants, config.size)

        def evaluate_one(variant):
            timer = FeatureTimer(variant, device)
            features = timer(*load_inputs(paths, variant.input_size(config.size), timer.wants_sources))
            return timer.result({"metric": value})

        rows = evaluate_each(variants, evaluate_one, on_result)
        settings = eval_settings(variants, config.size, device, weights, extra=...)
        return TaskResults("mytask", rows, settings, ["metric"])
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..backbones import Backbone
from ..errors import FeatliftError
from ..images import image_to_tensor, load_image, resize_images
from ..meters import peak_memory_mib, timed_call
from ..pretrained import find_shipped_checkpoint
from ..speedups import optimize_pipeline
from ..variants import FeatureVariant, parse_variants
from .report import VariantResult

logger = logging.getLogger(__name__)

BASE_VARIANTS = ("none", "bilinear", "input-2x")


def default_variant_specs(backbone: Backbone) -> list[str]:
    """none, bilinear, input-2x, and lift when a shipped checkpoint fits the backbone."""
    specs = list(BASE_VARIANTS)
    if find_shipped_checkpoint(backbone.name, backbone.layer, backbone.facet, "lift") is not None:
        specs.append("lift")
    return specs


def prepare_variants(
    specs: Sequence[str] | None,
    backbone: Backbone,
    device: torch.device | str = "cpu",
    defaults: dict[str, Any] | None = None,
) -> list[FeatureVariant]:
    """The variants of `specs` (default `default_variant_specs`) for `backbone`, ready to run on `device`;
    `defaults`: options for every method that takes them (`featlift.variants.implied_options`).

    Each variant runs with featlift's default inference transforms (BN folding, channels-last), as
    ``featlift extract`` does, so its cost is what a user pays; the transforms leave the outputs unchanged up to float rounding.
    """
    variants = parse_variants(list(specs or default_variant_specs(backbone)), backbone, defaults)
    for variant in variants:
        variant.pipeline = optimize_pipeline(variant.pipeline)
        variant.to(device)
    return variants


def check_sizes(variants: Sequence[FeatureVariant], base: tuple[int, int]) -> None:
    """Fail early (with a suggestion) when a variant's input size is not a multiple of the patch size."""
    for variant in variants:
        variant.output_grid(base)


def wants_sources(variant: Any) -> bool:
    """Whether `variant`'s upsampler is guided by the images before resizing (capabilities.guide "output"
    or "source"); those variants get the decoded images alongside the resized ones."""
    return bool(getattr(getattr(variant, "pipeline", None), "wants_sources", False))  # test doubles have none


def load_image_tensor(path: str | os.PathLike, size: tuple[int, int] | None) -> torch.Tensor:
    """One image file -> ``[3, H, W]`` in ``[0, 1]`` at `size` (bicubic, aspect ratio ignored)."""
    return image_to_tensor(load_image(path), size)


def load_batch(paths: Sequence[str | os.PathLike], size: tuple[int, int]) -> torch.Tensor:
    """Image files -> ``[B, 3, H, W]`` in ``[0, 1]``, each resized to `size` (H, W) with bicubic filtering."""
    return load_inputs(paths, size)[0]


def load_inputs(
    paths: Sequence[str | os.PathLike], size: tuple[int, int], with_sources: bool = False
) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """`load_batch` of `paths`, and, `with_sources`, the decoded images at their own size (a list of
    ``[3, Hk, Wk]`` in ``[0, 1]``) for variants guided at high resolution (`wants_sources`), else None."""
    decoded = [image_to_tensor(load_image(p)) for p in paths]
    images = torch.cat([resize_images(image[None], size) for image in decoded])
    return images, (decoded if with_sources else None)


class FeatureTimer:
    """Runs a variant on batches and accumulates the time and peak memory of the feature computation only.

    ``timer(images, sources=None)`` -> features on the timer's device; `sources` (the images before resizing,
    see `wants_sources`) are passed on to the variant when given. ``timer.ms_per_image`` averages over every
    image seen, ``timer.peak_memory_mib`` is the largest peak of one call (`featlift.meters.peak_memory_mib`:
    CUDA max allocated, on CPU the live tensors the call creates). Memory is measured in an extra, untimed
    call on the first batch of each shape, so the timed calls run without the tracker. The first call of a
    variant pays one-off costs (allocator warm-up, lazy init); call ``warmup(images)`` first to exclude them.
    """

    def __init__(self, variant: FeatureVariant, device: torch.device | str = "cpu"):
        self.variant = variant
        self.device = torch.device(device)
        self.wants_sources = wants_sources(variant)
        self.seconds = 0.0
        self.images = 0
        self.peak_memory_mib = 0.0
        self._measured_shapes: set[tuple[int, ...]] = set()

    def warmup(self, images: torch.Tensor, sources: list[torch.Tensor] | None = None) -> None:
        """One untimed forward pass on (a slice of) `images`."""
        self._run(images[:1].to(self.device), self._on_device(sources[:1] if sources is not None else None))

    def __call__(self, images: torch.Tensor, sources: list[torch.Tensor] | None = None) -> torch.Tensor:
        images, sources = images.to(self.device), self._on_device(sources)
        if tuple(images.shape) not in self._measured_shapes:
            self._measured_shapes.add(tuple(images.shape))
            self.peak_memory_mib = max(
                self.peak_memory_mib, peak_memory_mib(lambda: self._run(images, sources), self.device)
            )
        features, seconds = timed_call(lambda: self._run(images, sources), self.device)
        self.seconds += seconds
        self.images += images.shape[0]
        return features

    def _run(self, images: torch.Tensor, sources: list[torch.Tensor] | None) -> torch.Tensor:
        if sources is None:
            return self.variant(images)
        return self.variant(images, sources)

    def _on_device(self, sources: list[torch.Tensor] | None) -> list[torch.Tensor] | None:
        return [source.to(self.device) for source in sources] if sources is not None else None

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


def evaluate_each(
    variants: Sequence[FeatureVariant],
    evaluate_one: Callable[[FeatureVariant], VariantResult],
    on_result: Callable[[VariantResult], None] | None = None,
) -> list[VariantResult]:
    """``evaluate_one(variant)`` for each variant in turn; each row is logged (debug) and handed to `on_result`
    as soon as it is done (an evaluation of several variants can take a while)."""
    rows = []
    for variant in variants:
        row = evaluate_one(variant)
        metrics = " ".join(f"{name} {value:.1f}" for name, value in row.metrics.items())
        logger.debug("%s: %s (%.0f ms/image features)", row.variant, metrics, row.ms_per_image)
        rows.append(row)
        if on_result is not None:
            on_result(row)
    return rows


def eval_settings(
    variants: Sequence[FeatureVariant],
    base: tuple[int, int] | None,
    device: torch.device | str,
    weights: str | os.PathLike | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The settings block of results.json: backbone (with its `weights` file, None for timm's download),
    variants (with checkpoints and grids), base size, device, then `extra`."""
    backbone = variants[0].pipeline.backbone
    settings: dict[str, Any] = {
        "backbone": backbone.name,
        "weights": str(weights) if weights is not None else None,
        "layer": backbone.layer if len(backbone.layers) == 1 else list(backbone.layers),
        "facet": backbone.facet,
        "base_size": list(base) if base else None,
        "device": str(device),
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
    path = Path(path)
    ok = path.is_dir() if kind == "folder" else path.is_file()
    if not ok:
        raise FeatliftError(f"{path}: no such {kind}; expected layout: {layout}")
