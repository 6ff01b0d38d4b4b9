"""A timm CNN (ResNet, ConvNeXt, ... anything with ``features_only``) tapped at the output of one stage.

Stages are numbered as timm's ``feature_info`` of the model, 0-based; for ``resnet50`` stage 0 is the stem
(``act1``, stride 2, 64 channels) and stages 1-4 are ``layer1``-``layer4`` (strides 4, 8, 16, 32; 256, 512,
1024, 2048 channels); for ``convnext_tiny`` stages 0-3 are ``stages.0``-``stages.3`` (strides 4, 8, 16, 32;
96, 192, 384, 768 channels). The model is built with ``features_only=True, out_indices=(stage,)``, which
keeps only the modules up to that stage, so later stages are never run. The stage's stride plays the part of
a ViT's patch size: inputs must be multiples of it and upsamplers see it as ``patch_size``. Attention facets
do not exist in a CNN (facet ``token`` only), and one stage is tapped at a time (stages have different
strides, so their maps do not stack).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import timm
import torch
from torch import nn

from ..errors import BackboneError, InputSizeError
from .base import Backbone
from .vit import _build_timm_model, _resolved_name, check_model_name


@dataclass(frozen=True)
class Stage:
    """One entry of a CNN's ``feature_info``: its index, module name, stride and channels."""

    index: int
    module: str
    stride: int
    channels: int

    def describe(self) -> str:
        return f"{self.index} ({self.module}: stride {self.stride}, {self.channels} channels)"


def cnn_stages(name: str, timm_kwargs: dict | None = None) -> list[Stage]:
    """The stages timm model `name` offers through ``features_only``, read from a copy built on the meta
    device (no memory, no weights)."""
    check_model_name(name)
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            model = timm.create_model(
                name.split(".")[0], pretrained=False, num_classes=0, **(timm_kwargs or {})
            )
    except Exception as exc:
        raise BackboneError(f"cannot build {name}: {type(exc).__name__}: {exc}") from exc
    info = getattr(model, "feature_info", None)
    if not info:
        raise BackboneError(
            f"{name}: is neither a Vision Transformer nor a CNN with timm feature_info (features_only); "
            "featlift cannot tap it"
        )
    return [
        Stage(
            index=k,
            module=str(entry["module"]),
            stride=int(entry["reduction"]),
            channels=int(entry["num_chs"]),
        )
        for k, entry in enumerate(info)
    ]


def resolve_stage(layer: int | Sequence[int] | None, stages: list[Stage], name: str) -> Stage:
    """The stage `layer` names (None: the last; negative from the end), else `BackboneError` listing them."""
    listed = "; ".join(stage.describe() for stage in stages)
    if layer is not None and not isinstance(layer, int):
        asked = list(layer)
        if len(asked) != 1:
            raise BackboneError(
                f"layer {','.join(map(str, asked))}: {name} is a CNN, tapped at one stage at a time (its stages "
                f"have different strides, so their maps do not concatenate); its stages: {listed}"
            )
        layer = asked[0]
    if layer is None:
        return stages[-1]
    if isinstance(layer, bool) or not isinstance(layer, int) or not -len(stages) <= layer < len(stages):
        raise BackboneError(
            f"layer {layer}: {name} has {len(stages)} stages (timm feature_info, 0-based), so layer must be in "
            f"0..{len(stages) - 1} (or -1 for the last): {listed}"
        )
    return stages[layer % len(stages)]


class CNNBackbone(Backbone):
    """A frozen timm ``features_only`` CNN that maps normalised images ``[B, 3, H, W]`` to the output of one
    stage ``[B, C, H/s, W/s]`` (``s`` the stage's stride, `patch_size` here). ``H`` and ``W`` must be
    multiples of ``s``.

    Example:
        >>> backbone = create_backbone("resnet50", weights="resnet50.safetensors", layer=3)
        >>> backbone(backbone.normalize(images)).shape  # [B, 1024, H/16, W/16]
    """

    grid_unit = "stride"

    def __init__(self, model: nn.Module, name: str, stage: Stage, depth: int):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.name = name
        self.stage = stage
        self.layers = (stage.index,)
        self.layer = stage.index
        self.depth = depth  # the model's number of stages
        self.facet = "token"
        self.patch_size = stage.stride
        self.num_prefix_tokens = 0
        self.layer_channels = (stage.channels,)
        self.channels = stage.channels
        self._set_normalization(model)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images ``[B, 3, H, W]`` -> the stage's features ``[B, C, H/s, W/s]``."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise InputSizeError(f"expected images of shape [B, 3, H, W], got {list(images.shape)}")
        grid = self.grid_size(images.shape[-2], images.shape[-1])
        (features,) = self.model(images)
        if tuple(features.shape[-2:]) != grid or features.shape[1] != self.channels:
            raise BackboneError(
                f"{self.name} stage {self.layer} gave features {list(features.shape)} for input "
                f"{images.shape[-2]}x{images.shape[-1]}; expected [B, {self.channels}, {grid[0]}, {grid[1]}]"
            )
        return features


def create_cnn_backbone(
    name: str,
    *,
    weights: str | os.PathLike | None = None,
    layer: int | Sequence[int] | None = None,
    facet: str = "token",
    pretrained: bool = True,
    **timm_kwargs,
) -> CNNBackbone:
    """Build a frozen `CNNBackbone` at stage `layer` (see the module docstring); `create_backbone` calls this
    for models that are not ViTs."""
    if facet != "token":
        raise BackboneError(
            f"facet {facet!r}: {name} is a CNN, which has no attention query/key/value; "
            "use facet 'token' (the stage's output)"
        )
    for reserved in ("features_only", "out_indices"):
        if reserved in timm_kwargs:
            raise BackboneError(
                f"{reserved}: set by featlift for a CNN backbone (pick the stage with layer=)"
            )
    stages = cnn_stages(name, timm_kwargs)
    stage = resolve_stage(layer, stages, name)
    full = _build_timm_model(name, weights, pretrained, timm_kwargs, vit=False)  # weights loaded and checked
    with torch.random.fork_rng(devices=[]):
        model = timm.create_model(
            name,
            pretrained=False,
            num_classes=0,
            features_only=True,
            out_indices=(stage.index,),
            **timm_kwargs,
        )
    model.load_state_dict(_feature_state(model, full.state_dict(), name), strict=True)
    return CNNBackbone(model, _resolved_name(full, name), stage, depth=len(stages))


def _feature_state(features: nn.Module, full: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """The full model's tensors under the names of its ``features_only`` copy, which keeps the modules up to
    the stage and, for some families (ConvNeXt), flattens a top-level sequential ``stages.0`` into ``stages_0``."""
    state = {}
    for key, target in features.state_dict().items():
        head, _, rest = key.partition(".")
        candidates = [key, head.replace("_", ".", 1) + "." + rest if rest else head.replace("_", ".", 1)]
        found = next((c for c in candidates if c in full and full[c].shape == target.shape), None)
        if found is None:
            raise BackboneError(f"{name}: cannot find the weights of features_only tensor {key} in the model")
        state[key] = full[found]
    return state
