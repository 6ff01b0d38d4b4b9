"""What every featlift backbone offers: a frozen timm model tapped at one or more layers, mapping normalised
images ``[B, 3, H, W]`` to a feature map ``[B, C, H / stride, W / stride]``.

`Backbone` holds the parts a ViT (`featlift.backbones.vit.ViTBackbone`) and a CNN stage
(`featlift.backbones.cnn.CNNBackbone`) share: input normalisation, the grid of an input size, the weights'
fingerprint and the description of the tapped layers. A subclass sets ``model``, ``name``, ``layers``
(increasing, 0-based), ``layer`` (the deepest of them), ``layer_channels``, ``channels`` (their sum),
``facet``, ``patch_size`` (the stride of the grid in input pixels) and ``num_prefix_tokens``, calls
`_set_normalization`, and implements ``forward``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import InputSizeError
from ..fingerprint import state_dict_fingerprint

LAYERS_AS = ("concat", "separate")
"""How several tapped layers are given: one map with their channels concatenated in layer order
(``concat``), or each layer upsampled and stored on its own (``separate``)."""


@dataclass(frozen=True)
class FeatureShape:
    """What a backbone gives: channels, and the stride (patch size) of its grid in input pixels."""

    channels: int
    stride: int


class Backbone(nn.Module):
    """Shared behaviour of featlift's backbones (see the module docstring)."""

    model: nn.Module
    name: str
    layers: tuple[int, ...]
    layer: int
    layer_channels: tuple[int, ...]
    channels: int
    facet: str
    patch_size: int
    num_prefix_tokens: int
    layers_as: str = "concat"
    grid_unit = "patch size"  # what the grid's stride is called in messages

    def _set_normalization(self, model: nn.Module) -> None:
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        self.mean = tuple(float(v) for v in cfg.get("mean", (0.485, 0.456, 0.406)))
        self.std = tuple(float(v) for v in cfg.get("std", (0.229, 0.224, 0.225)))
        self.register_buffer("_mean", torch.tensor(self.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(self.std).view(1, 3, 1, 1), persistent=False)
        self._fingerprint: str | None = None

    @property
    def layer_label(self) -> str:
        """The tapped layers as text: ``"11"`` for one, ``"3,6,9,11"`` for several."""
        return ",".join(str(layer) for layer in self.layers)

    def split_layers(self, features: torch.Tensor) -> dict[int, torch.Tensor]:
        """A map with the layers' channels concatenated (``[..., C, h, w]``, ``C = sum(layer_channels)``)
        -> layer index -> its own channels, in layer order."""
        if features.shape[-3] != self.channels:
            raise InputSizeError(
                f"features have {features.shape[-3]} channels; {self.name} layers {self.layer_label} give "
                f"{self.channels} ({'+'.join(map(str, self.layer_channels))})"
            )
        parts = torch.split(features, list(self.layer_channels), dim=-3)
        return dict(zip(self.layers, parts, strict=True))

    def set_layers_as(self, layers_as: str) -> None:
        """``concat`` or ``separate``; see `LAYERS_AS`."""
        if layers_as not in LAYERS_AS:
            raise ValueError(f"layers_as {layers_as!r}: expected one of {', '.join(LAYERS_AS)}")
        self.layers_as = layers_as

    def output_shape(self) -> FeatureShape:
        return FeatureShape(channels=self.channels, stride=self.patch_size)

    @property
    def normalization(self) -> dict[str, list[float]]:
        return {"mean": list(self.mean), "std": list(self.std)}

    def fingerprint(self) -> str:
        """SHA-256 (first 16 hex digits) of the backbone weights: names, dtypes, shapes and values."""
        if self._fingerprint is None:
            self._fingerprint = state_dict_fingerprint(self.model.state_dict())
        return self._fingerprint

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """``[0, 1]`` RGB images -> the model's input normalisation."""
        return (images - self._mean.to(images.dtype)) / self._std.to(images.dtype)

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """The feature grid for an input of ``height x width`` pixels; both must be multiples of the stride."""
        if height % self.patch_size or width % self.patch_size:
            p = self.patch_size
            raise InputSizeError(
                f"input size {height}x{width} is not a multiple of {self.name}'s {self.grid_unit} {p}; "
                f"resize to e.g. {max(p, round(height / p) * p)}x{max(p, round(width / p) * p)}"
            )
        return height // self.patch_size, width // self.patch_size
