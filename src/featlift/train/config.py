"""`TrainConfig`: everything a training run takes."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any


@dataclass
class TrainConfig:
    """Everything `featlift train` takes; the defaults are the CLI's."""

    images: str
    out: str
    backbone: str = "vit_small_patch14_dinov2.lvd142m"
    weights: str | None = None
    layer: int | tuple[int, ...] | None = None  # several: ViT blocks tapped at once, channels concatenated
    facet: str = "token"
    upsampler: str = "lift"
    objective: str | None = None  # default: the upsampler class's capabilities.objective
    residual: bool = True
    # constructor settings of the upsampler (stored in its checkpoint), e.g. {"gating": False} for fade
    upsampler_args: dict[str, Any] = field(default_factory=dict)
    epochs: int = 5
    batch_size: int = 8
    lr: float = 1e-3
    loss: str = "cosine"
    image_size: int = 448
    augment: bool = False
    cache: str | None = None  # default RUN_DIR/cache
    use_cache: bool = True
    cache_dtype: str = "float16"
    resume: bool = False
    overwrite: bool = False
    seed: int = 0
    val_fraction: float = 0.1
    device: str | None = None
    workers: int = 0
    progress: bool = True
    command: str | None = None  # how the run was asked for, as recorded in the checkpoint; default `describe`

    def describe(self) -> str:
        """This config as Python, its settings at their defaults left out: ``TrainConfig(images=..., ...)``."""
        defaults = TrainConfig(images="", out="")
        shown = [
            f"{f.name}={getattr(self, f.name)!r}"
            for f in fields(self)
            if f.name in ("images", "out")
            or (f.name != "command" and getattr(self, f.name) != getattr(defaults, f.name))
        ]
        return f"TrainConfig({', '.join(shown)})"
