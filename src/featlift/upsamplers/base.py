"""The contract every upsampler keeps: ``forward(features, guide, output_size)`` and its declared `Capabilities`.

A method is one class that subclasses `Upsampler`, declares ``capabilities``, implements `forward`, and is
registered with ``@register_upsampler("name")``. The pipeline reads the capabilities to hand the method the
guide image it asks for and to pick the output size when none is requested; training reads them to pick
the default objective; variant specs (``name:key=value``) may set the constructor arguments in ``options``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputSizeError

GUIDES = ("none", "input", "output", "source")
"""What a method is guided by:

- ``none``: nothing; ``guide`` is None;
- ``input``: the image the backbone saw, at the backbone's input size;
- ``output``: the image resized to the output size (one pixel per output feature);
- ``source``: the decoded source image at its own size when the caller has it, else the ``input`` image.

Guides are normalised as the backbone normalises its input.
"""

OUTPUT_SIZES = ("any", "power-of-two", "fixed")
"""The output sizes a method produces natively: any size in one pass, ``2**k`` times the token grid, or a
fixed factor of it. Every method accepts every ``output_size``; one that is not native is reached by a
bilinear resize of the nearest larger native output."""

BACKBONES = ("trained", "any")
"""Which features a trained method's weights serve: those of the backbone, layer and facet it was trained on
(loading it for others is refused), or any backbone's (the method reads features only through a
channel-agnostic layer, e.g. AnyUp; loading it for another backbone only warns)."""

FITTING = ("none", "trained", "per-image")
"""Where a method's parameters come from: it has none, they are trained once (and saved in a checkpoint),
or they are optimised on each image at test time (see `Upsampler.fit_upsample`)."""

FeaturesOf = Callable[[torch.Tensor], torch.Tensor]
"""The backbone as a per-image method sees it: normalised images ``[N, 3, H, W]`` (as the guide ``input`` is
normalised) -> the backbone's tokens ``[N, C, H / patch, W / patch]``, computed without gradients."""


@dataclass(frozen=True)
class Capabilities:
    """What a method needs and does; see `GUIDES`, `OUTPUT_SIZES`, `FITTING` and `BACKBONES` for the values."""

    guide: str = "input"
    output_sizes: str = "any"
    factor: int | None = None  # the factor of ``output_sizes="fixed"``
    fitting: str = "trained"
    objective: str | None = None  # the training objective `featlift train` uses by default
    backbones: str = "trained"  # see `BACKBONES`

    def __post_init__(self) -> None:
        for field, value, allowed in (
            ("guide", self.guide, GUIDES),
            ("output_sizes", self.output_sizes, OUTPUT_SIZES),
            ("fitting", self.fitting, FITTING),
            ("backbones", self.backbones, BACKBONES),
        ):
            if value not in allowed:
                raise ValueError(f"Capabilities.{field} {value!r}: expected one of {', '.join(allowed)}")
        if (self.output_sizes == "fixed") != (self.factor is not None):
            raise ValueError("Capabilities.factor is given exactly when output_sizes is 'fixed'")
        if self.factor is not None and self.factor < 1:
            raise ValueError(f"Capabilities.factor must be >= 1, got {self.factor}")

    @property
    def trainable(self) -> bool:
        return self.fitting == "trained"


def check_inputs(
    features: torch.Tensor, guide: torch.Tensor | None, output_size: tuple[int, int], needs_guide: bool = True
) -> tuple[int, int]:
    """Raise `InputSizeError` on ill-shaped arguments of `Upsampler.forward`; return `output_size` as a tuple."""
    if features.ndim != 4:
        raise InputSizeError(f"features: expected [B, C, h, w], got {list(features.shape)}")
    if guide is None:
        if needs_guide:
            raise InputSizeError("guide: this upsampler needs a guide image [B, 3, H, W], got None")
    else:
        if guide.ndim != 4 or guide.shape[1] != 3:
            raise InputSizeError(f"guide: expected [B, 3, H, W], got {list(guide.shape)}")
        if guide.shape[0] != features.shape[0]:
            raise InputSizeError(f"batch sizes differ: features {features.shape[0]}, guide {guide.shape[0]}")
    size = tuple(int(s) for s in output_size)
    if len(size) != 2 or min(size) < 1:
        raise InputSizeError(f"output_size: expected (height, width) >= 1, got {output_size!r}")
    return size  # type: ignore[return-value]


def resize_features(features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """`features` bilinearly resized to `size` (``align_corners=False``); unchanged when already that size."""
    if tuple(features.shape[-2:]) == tuple(size):
        return features
    return F.interpolate(features, size=tuple(size), mode="bilinear", align_corners=False)


class Upsampler(nn.Module):
    """Maps backbone features ``[B, C, h, w]`` (and a guide image) to features ``[B, C, *output_size]``.

    Subclasses set ``capabilities``, implement `forward`, and may override `from_features` (how to build
    the method for a backbone), `native_output_size` (its output size when none is asked for) and `config`
    (the constructor arguments a checkpoint stores). ``options`` names the constructor arguments that a
    variant spec may set (``lift:iters=2``) without changing the weights.
    """

    name: ClassVar[str] = ""
    capabilities: ClassVar[Capabilities] = Capabilities()
    options: ClassVar[tuple[str, ...]] = ()
    trainable: ClassVar[bool] = True  # set from ``capabilities`` for every subclass

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.trainable = cls.capabilities.trainable

    @classmethod
    def from_features(cls, channels: int, patch_size: int, **args: Any) -> Upsampler:
        """The method for a backbone with `channels` feature channels and `patch_size` pixel patches.

        The default passes ``channels`` and ``patch_size`` to the constructor when it takes them.
        """
        taken = inspect.signature(cls.__init__).parameters
        shape = {"channels": channels, "patch_size": patch_size}
        return cls(**{k: v for k, v in shape.items() if k in taken}, **args)

    @classmethod
    def setting_names(cls) -> list[str]:
        """The constructor arguments a training run may choose (``featlift train --upsampler NAME:key=value``):
        what `config` stores, not the run-time `options` (chunking, ``iters``), the backbone's shape
        (``channels``, ``patch_size``) nor ``residual`` (``--no-residual``)."""
        parameters = inspect.signature(cls.__init__).parameters.values()
        return [
            p.name
            for p in parameters
            if p.name not in ("self", "channels", "patch_size", "residual")
            and p.name not in cls.options
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        ]

    def native_output_size(self, grid: tuple[int, int]) -> tuple[int, int]:
        """The output size for a ``grid`` of tokens when the caller asks for none: 2x, or the fixed factor."""
        factor = self.capabilities.factor or 2
        return grid[0] * factor, grid[1] * factor

    def config(self) -> dict[str, Any]:
        """Constructor arguments that rebuild this module (stored in checkpoints)."""
        return {}

    def fit_upsample(
        self,
        features: torch.Tensor,
        guide: torch.Tensor | None,
        output_size: tuple[int, int],
        features_of: FeaturesOf,
    ) -> torch.Tensor:
        """What the pipeline calls for a method with ``fitting="per-image"``, with autograd enabled (outside
        inference mode) and ordinary copies of `features` and `guide`: fit on each image of the batch and return
        its upsampled features, as `forward` does. `features_of` (`FeaturesOf`) runs the backbone on other images,
        e.g. jittered views of the guide, for a fit that needs their features. The default ignores it and calls
        `forward`; a method that needs the backbone overrides this. The method keeps nothing of a fit after it
        returns (its state dict stays that of the freshly built module)."""
        return self(features, guide, output_size)

    def forward(
        self, features: torch.Tensor, guide: torch.Tensor | None, output_size: tuple[int, int]
    ) -> torch.Tensor:
        raise NotImplementedError
