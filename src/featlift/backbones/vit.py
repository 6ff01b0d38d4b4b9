"""A timm Vision Transformer tapped at one facet of one block, or of several blocks in one forward pass
(their maps concatenated along channels in block order), returning a patch-token map.

Facets of block `l` (0-based):
- ``token``: the block's output tokens, passed through the model's final norm (as DINOv2's
  ``get_intermediate_layers(norm=True)`` and timm's ``forward_features`` do for the last block);
- ``query`` / ``key`` / ``value``: exactly what the block's attention computes with: the projections
  of its input with their biases, query and key after the ``q_norm`` / ``k_norm`` and the rotary position
  embedding of rotary ViTs (DINOv3, EVA02); see `featlift.backbones.facets`. The heads are concatenated
  head-major into ``num_heads * head_dim`` channels.

Prefix tokens (CLS, registers) are dropped; the result is ``[B, C, H / patch, W / patch]``.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import re
from collections.abc import Iterator, Mapping, Sequence

import timm
import torch
from torch import nn

from ..errors import BackboneError, InputSizeError
from ..weightfiles import read_weights_file, refuse_non_finite, some_of
from .base import LAYERS_AS, Backbone, FeatureShape  # noqa: F401  (FeatureShape: imported from here before)
from .facets import attention_facet, facet_channels, uses_rotary_embedding
from .families import fixed_input_size, fixed_size_advice, timm_build_kwargs

logger = logging.getLogger(__name__)

FACETS = ("token", "query", "key", "value")

# Containers that training code wraps a backbone state dict in, and prefixes it adds to the keys.
_STATE_DICT_CONTAINERS = ("state_dict", "model", "teacher", "model_ema", "state_dict_ema")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP, torch.compile
_BACKBONE_PREFIX = "backbone."


class _StopForward(Exception):
    """Raised from a hook to stop the forward pass once the needed tensor is captured."""


def load_weights_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a backbone state dict from .safetensors, .pth/.pt/.bin or PaddlePaddle .pd/.pdparams.

    Accepts timm layout and the original DINO / DINOv2 layouts (timm converts those when loading),
    bare or inside ``{"state_dict"|"model"|"teacher": ...}``, with ``module.`` prefixes; when the tensors
    sit under ``backbone.`` (a DINO/DINOv2 training checkpoint), only those are kept and their heads dropped.
    MAE-layout checkpoints lose their decoder and mask token (``fc_norm`` stands in for a missing ``norm``),
    and a plain pickle (a PaddlePaddle checkpoint, told by its content) is read with the restricted
    unpickler and converted from Paddle's layout (see `checkpoint_layouts`).
    """
    from ..weightfiles import PICKLE, weights_file_format
    from .checkpoint_layouts import mae_layout_to_timm, paddle_layout_to_timm

    state = read_weights_file(path, BackboneError, pickles=True)
    if weights_file_format(path) == PICKLE:
        cleaned = paddle_layout_to_timm(state, f"weights file {path}")
        refuse_non_finite(cleaned, f"weights file {path}", BackboneError)
        return cleaned
    while isinstance(state, Mapping) and not any(isinstance(v, torch.Tensor) for v in state.values()):
        inner = next((state[k] for k in _STATE_DICT_CONTAINERS if isinstance(state.get(k), Mapping)), None)
        if inner is None:
            raise BackboneError(
                f"weights file {path}: holds no tensors (top-level keys: {sorted(state)[:10]})"
            )
        state = inner
    if not isinstance(state, Mapping):
        raise BackboneError(f"weights file {path}: expected a state dict, found {type(state).__name__}")
    cleaned = {}
    for key, value in state.items():
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
        cleaned[key] = value
    if any(key.startswith(_BACKBONE_PREFIX) for key in cleaned):
        # a training wrapper (DINO/DINOv2 teacher): the ViT is under backbone., heads beside it are not ours
        cleaned = {
            k[len(_BACKBONE_PREFIX) :]: v for k, v in cleaned.items() if k.startswith(_BACKBONE_PREFIX)
        }
    cleaned = mae_layout_to_timm(cleaned)
    refuse_non_finite(cleaned, f"weights file {path}", BackboneError)
    return cleaned


def summarize_load_error(message: str, examples: int = 3) -> str:
    """Shorten torch's ``load_state_dict`` error (which lists every key) to counts and a few examples."""
    found = {
        "missing": re.search(r"Missing key\(s\) in state_dict: (.*?)\.\s*$", message, re.M),
        "unexpected": re.search(r"Unexpected key\(s\) in state_dict: (.*?)\.\s*$", message, re.M),
    }
    parts = []
    for kind, match in found.items():
        if match:
            keys = re.findall(r'"([^"]+)"', match.group(1))
            parts.append(f"{kind} keys {some_of(keys, examples)}")
    shapes = re.findall(
        r"size mismatch for ([^:]+): copying a param with shape torch.Size\((\[.*?\])\) from checkpoint, "
        r"the shape in current model is torch.Size\((\[.*?\])\)",
        message,
    )
    if shapes:
        listed = [f"{key} is {file} in the file, {model} in the model" for key, file, model in shapes]
        parts.append(f"shape mismatches: {some_of(listed, examples, sep='; ')}")
    if not parts:
        return message[:800]
    return "; ".join(parts) + ". Is the file for another model (size, patch, registers)?"


class _MissingKeysRecorder(logging.Handler):
    """Catches timm's report of the model tensors a non-strict load left untouched."""

    PATTERN = re.compile(r"Missing keys \((.*)\) discovered while loading pretrained weights")

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.missing: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        match = self.PATTERN.match(record.getMessage())
        if match:
            self.missing += [key.strip() for key in match.group(1).split(",") if key.strip()]


@contextlib.contextmanager
def missing_keys_of_timm_load() -> Iterator[_MissingKeysRecorder]:
    """Record the keys timm's pretrained load leaves missing.

    timm loads non-strictly whenever the classifier is dropped (``num_classes=0``, as here), so a file
    without, say, the final norm would leave it at random init with only an INFO log line. Listening to
    that line gives exactly timm's own load result, after its layout conversion for the model family.
    """
    timm_logger = logging.getLogger("timm.models._builder")
    recorder, level = _MissingKeysRecorder(), timm_logger.level
    timm_logger.addHandler(recorder)
    if not timm_logger.isEnabledFor(logging.INFO):
        timm_logger.setLevel(logging.INFO)
    try:
        yield recorder
    finally:
        timm_logger.removeHandler(recorder)
        timm_logger.setLevel(level)


def _patch_kernel(state: Mapping[str, torch.Tensor]) -> tuple[str, torch.Tensor] | None:
    """The patch embedding of a ViT state dict: its conv kernel ``[dim, 3, p, p]`` on the RGB pixels.

    That is ``patch_embed.proj.weight`` in the timm, DINO and DINOv2 layouts, and otherwise the one
    4-D tensor with 3 input channels (e.g. ``conv1.weight`` of OpenAI CLIP), if there is exactly one.
    """
    rgb_kernels = [
        (k, v) for k, v in state.items() if isinstance(v, torch.Tensor) and v.ndim == 4 and v.shape[1] == 3
    ]
    named = [(k, v) for k, v in rgb_kernels if k.endswith("patch_embed.proj.weight")]
    found = named or rgb_kernels
    return found[0] if len(found) == 1 else None


def check_patch_embedding(
    state: Mapping[str, torch.Tensor], model: nn.Module, source: str, name: str
) -> None:
    """Refuse weights made for another patch size: timm would silently resample their patch embedding."""
    in_file = _patch_kernel(state)
    in_model = _patch_kernel(model.state_dict())
    if in_file is None or in_model is None or in_file[1].shape == in_model[1].shape:
        return
    (file_key, file_kernel), (_, model_kernel) = in_file, in_model
    raise BackboneError(
        f"{source} does not fit {name}: its patch embedding {file_key} is {list(file_kernel.shape)} "
        f"(patch {file_kernel.shape[-2]}x{file_kernel.shape[-1]}), but {name} has {list(model_kernel.shape)} "
        f"(patch {model_kernel.shape[-2]}x{model_kernel.shape[-1]}). timm would resize the kernel and load it "
        "anyway, giving other features: pick the backbone the file was trained as"
    )


def check_model_name(name: str) -> None:
    """Refuse a name timm does not know, listing similar ones."""
    if not timm.is_model(name.split(".")[0]):
        close = difflib.get_close_matches(name.split(".")[0], timm.list_models(), n=8, cutoff=0.6)
        raise BackboneError(f"unknown timm model {name!r}; similar names: {', '.join(close) or 'none'}")


def _build_timm_model(
    name: str,
    weights: str | os.PathLike | None,
    pretrained: bool,
    timm_kwargs: dict | None = None,
    vit: bool = True,
) -> nn.Module:
    """`vit`: a ViT, built with its family's size handling (`families.timm_build_kwargs`: ``dynamic_img_size``
    where timm supports it); else a CNN (whose own kwargs, e.g. ``features_only``, come in `timm_kwargs`)."""
    check_model_name(name)
    kwargs = timm_build_kwargs(name, timm_kwargs) if vit else dict(num_classes=0, **(timm_kwargs or {}))
    try:
        if weights is not None:
            state = load_weights_file(weights)
            overlay = dict(state_dict=dict(state), source="", file=None)  # timm may pop keys from it
            with missing_keys_of_timm_load() as load:
                model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
            if load.missing:
                raise BackboneError(
                    f"weights file {weights} does not fit {name}: it lacks {some_of(load.missing)}, "
                    "which would stay randomly initialised. Is the file for another model, or only part of one?"
                )
            check_patch_embedding(state, model, f"weights file {weights}", name)
            return model
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
        if pretrained:
            refuse_non_finite(model.state_dict(), f"the pretrained weights of {name}", BackboneError)
        return model
    except BackboneError:
        raise
    except RuntimeError as exc:
        if weights is not None:
            raise BackboneError(
                f"weights file {weights} does not fit {name}: {summarize_load_error(str(exc))}"
            ) from exc
        raise BackboneError(f"cannot build {name}: {exc}") from exc
    except (OSError, ConnectionError, TimeoutError) as exc:
        raise BackboneError(
            f"cannot download the pretrained weights of {name} ({type(exc).__name__}: {exc}). "
            "Without internet, pass a local file with --weights PATH (weights=PATH in Python)."
        ) from exc
    except Exception as exc:  # hub clients raise their own error types for offline/missing files
        if (
            "hub" in type(exc).__module__
            or "requests" in type(exc).__module__
            or "urllib" in type(exc).__module__
        ):
            raise BackboneError(
                f"cannot download the pretrained weights of {name} ({type(exc).__name__}). "
                "Without internet, pass a local file with --weights PATH (weights=PATH in Python)."
            ) from exc
        raise


class ViTBackbone(Backbone):
    """A frozen timm ViT that maps normalised images ``[B, 3, H, W]`` to ``[B, C, H/p, W/p]`` features.

    ``H`` and ``W`` must be multiples of the patch size ``p``; anything else raises `InputSizeError`
    (resize images first, e.g. with ``featlift.images.image_to_tensor``). Use `normalize` to turn
    ``[0, 1]`` images into the model's input normalisation.

    Example:
        >>> backbone = create_backbone("vit_small_patch14_dinov2.lvd142m", weights="dinov2_s14.safetensors")
        >>> feats = backbone(backbone.normalize(images))  # images in [0, 1]
    """

    def __init__(
        self, model: nn.Module, name: str, layer: int | Sequence[int] | None = None, facet: str = "token"
    ):
        super().__init__()
        for attribute in ("blocks", "patch_embed", "forward_intermediates", "num_prefix_tokens"):
            if not hasattr(model, attribute) and not (
                attribute == "patch_embed" and hasattr(model, "embeds")
            ):
                raise BackboneError(
                    f"{name}: is not a Vision Transformer featlift can tap (it has no `{attribute}`); "
                    "use a timm ViT such as vit_small_patch14_dinov2.lvd142m or vit_base_patch16_224.dino"
                )
        if facet not in FACETS:
            raise BackboneError(f"facet {facet!r}: expected one of {', '.join(FACETS)}")
        depth = len(model.blocks)
        self.model = model.eval().requires_grad_(False)
        self.name = name
        self.layers = resolve_layers(layer, depth, name)
        self.layer = self.layers[-1]  # the deepest tapped block (the only one, for one layer)
        self.facet = facet
        self.depth = depth
        embedding = model.patch_embed if hasattr(model, "patch_embed") else model.embeds  # NaFlexVit: embeds
        patch = embedding.patch_size
        patch = tuple(patch) if isinstance(patch, (tuple, list)) else (patch, patch)
        if patch[0] != patch[1]:
            raise BackboneError(f"{name}: non-square patches {patch} are not supported")
        self.patch_size = int(patch[0])
        self.num_prefix_tokens = int(model.num_prefix_tokens)
        self.layer_channels = tuple(self._channels_of(block) for block in self.layers)
        self.channels = sum(self.layer_channels)
        self._set_normalization(model)

    def _channels_of(self, layer: int) -> int:
        """Channels of the facet at block `layer`; `BackboneError` when featlift cannot tap that block's attention."""
        if self.facet == "token":
            return int(self.model.embed_dim)
        where = f"{self.name} ({type(self.model).__name__}): block {layer}"
        return facet_channels(self.model.blocks[layer], self.facet, where)

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """The token grid for ``height x width`` pixels: multiples of the patch, and the one size a fixed-size
        model (BEiT, the classic RADIO port) takes."""
        grid = super().grid_size(height, width)
        fixed = fixed_input_size(self.model)
        if fixed is not None and (height, width) != fixed:
            raise InputSizeError(
                f"input size {height}x{width}: {self.name} ({type(self.model).__name__}) takes only "
                f"{fixed[0]}x{fixed[1]} inputs; {fixed_size_advice(self.name)}"
            )
        return grid

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images ``[B, 3, H, W]`` -> features ``[B, C, H/p, W/p]``."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise InputSizeError(f"expected images of shape [B, 3, H, W], got {list(images.shape)}")
        grid_h, grid_w = self.grid_size(images.shape[-2], images.shape[-1])
        if self.facet == "token":
            tapped = self.model.forward_intermediates(
                images,
                indices=list(self.layers),
                norm=True,
                stop_early=True,
                intermediates_only=True,
                output_fmt="NCHW",
            )
            return tapped[0] if len(tapped) == 1 else torch.cat(tapped, dim=1)
        facets = []
        for layer, (block_input, rope) in zip(self.layers, self._block_inputs(images), strict=True):
            facet = attention_facet(self.model.blocks[layer], block_input, self.facet, rope=rope)
            facet = facet[:, self.num_prefix_tokens :]
            facets.append(facet.transpose(1, 2).reshape(facet.shape[0], -1, grid_h, grid_w))
        return facets[0] if len(facets) == 1 else torch.cat(facets, dim=1)

    def _block_inputs(self, images: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """For each tapped block: the tokens ``[B, N, C]`` entering it, prefix tokens included, and the rotary
        embedding it is called with (``rope=``, Eva; ``None`` for other blocks), from one forward pass that
        stops at the deepest tapped block (later blocks are not run)."""
        captured: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}

        def capture_at(layer: int):
            def capture(module: nn.Module, args: tuple, kwargs: dict) -> None:
                tokens = args[0] if args else kwargs["x"]
                captured[layer] = (tokens, kwargs.get("rope", args[1] if len(args) > 1 else None))
                if layer == self.layer:
                    raise _StopForward

            return capture

        handles = [
            self.model.blocks[layer].register_forward_pre_hook(capture_at(layer), with_kwargs=True)
            for layer in self.layers
        ]
        try:
            self.model.forward_intermediates(
                images, indices=[self.layer], stop_early=True, intermediates_only=True
            )
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        for layer in self.layers:
            block, rope = self.model.blocks[layer], captured[layer][1]
            if (
                rope is None
                and uses_rotary_embedding(block)
                and getattr(self.model, "rope", None) is not None
            ):
                raise BackboneError(f"{self.name}: block {layer} was called without its rotary embedding")
        return [captured[layer] for layer in self.layers]


def resolve_layers(layer: int | Sequence[int] | None, depth: int, name: str) -> tuple[int, ...]:
    """Block indices (0-based; negative from the end; None: the last) as increasing non-negative ints."""
    if layer is None:
        return (depth - 1,)
    asked = [layer] if isinstance(layer, int) else list(layer)
    if not asked or not all(isinstance(v, int) and not isinstance(v, bool) for v in asked):
        raise BackboneError(f"layer {layer!r}: expected a block index or a non-empty list of them")
    for value in asked:
        if not -depth <= value < depth:
            raise BackboneError(
                f"layer {value}: {name} has {depth} blocks, so layer must be in 0..{depth - 1} (or -1 for the last)"
            )
    layers = tuple(value % depth for value in asked)
    if any(b <= a for a, b in zip(layers, layers[1:], strict=False)):
        raise BackboneError(
            f"layers {','.join(map(str, asked))}: each layer must be deeper than the one before "
            f"(blocks {','.join(map(str, layers))}); list them in increasing order without repeats"
        )
    return layers


def _resolved_name(model: nn.Module, name: str) -> str:
    """`vit_small_patch14_dinov2` -> `vit_small_patch14_dinov2.lvd142m`: the name with timm's default tag."""
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    arch, tag = cfg.get("architecture"), cfg.get("tag")
    if arch and tag and name.split(".")[0] == arch:
        return f"{arch}.{tag}"
    return name


def is_vision_transformer(name: str, timm_kwargs: dict | None = None) -> bool:
    """Whether timm model `name` is a ViT featlift taps by blocks (else a CNN tapped by stage).

    Decided by the model's structure, built on the meta device (no memory, no weights): a ViT has
    ``blocks``, ``patch_embed`` (NaFlexVit: ``embeds``) and ``forward_intermediates``. A model that cannot be built there is taken
    for a ViT, which `ViTBackbone` then checks as before.
    """
    check_model_name(name)
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            probe = timm.create_model(
                name.split(".")[0], pretrained=False, num_classes=0, **(timm_kwargs or {})
            )
    except Exception:  # noqa: BLE001 - a probe only; the real build reports the problem
        return True
    has_embedding = hasattr(probe, "patch_embed") or hasattr(probe, "embeds")  # NaFlexVit: embeds
    is_vit = has_embedding and all(hasattr(probe, a) for a in ("blocks", "forward_intermediates"))
    return is_vit or not hasattr(probe, "feature_info")


def create_backbone(
    name: str,
    *,
    weights: str | os.PathLike | None = None,
    layer: int | Sequence[int] | None = None,
    facet: str = "token",
    pretrained: bool = True,
    layers_as: str = "concat",
    **timm_kwargs,
) -> Backbone:
    """Build a frozen, eval-mode backbone from a timm model name: a `ViTBackbone` for a Vision
    Transformer, a `~featlift.backbones.cnn.CNNBackbone` for a CNN with timm ``features_only`` support
    (ResNet, ConvNeXt, ...).

    Args:
        name: any timm ViT, e.g. ``vit_small_patch14_dinov2.lvd142m``, ``vit_base_patch8_224.dino``,
            ``vit_base_patch16_clip_224.openai``; or a CNN, e.g. ``resnet50``, ``convnext_tiny``.
        weights: a local .safetensors/.pth file (timm, DINO or DINOv2 layout). Without it, timm downloads
            the pretrained weights (needs internet) unless ``pretrained=False`` (random weights).
        layer: ViT: block index, 0-based; negative counts from the end; default the last block. A list
            (``[3, 6, 9, 11]``, increasing) taps several blocks in one forward pass; their channels are
            concatenated in that order. CNN: the stage, timm's ``feature_info`` index (0-based), default the last.
        facet: ``token``, ``query``, ``key`` or ``value`` (ViT only; a CNN has ``token`` only).
        layers_as: with several layers, ``concat`` (one map) or ``separate`` (each layer upsampled and stored
            on its own; see `featlift.backbones.base.LAYERS_AS`).
        timm_kwargs: passed on to ``timm.create_model`` (e.g. ``img_size``, or ``depth`` for a shallow copy).
    """
    if facet not in FACETS:
        raise BackboneError(f"facet {facet!r}: expected one of {', '.join(FACETS)}")
    if layers_as not in LAYERS_AS:
        raise BackboneError(f"layers_as {layers_as!r}: expected one of {', '.join(LAYERS_AS)}")
    if not is_vision_transformer(name, timm_kwargs):
        from .cnn import create_cnn_backbone  # cnn imports this module

        backbone = create_cnn_backbone(
            name, weights=weights, layer=layer, facet=facet, pretrained=pretrained, **timm_kwargs
        )
    else:
        model = _build_timm_model(name, weights, pretrained, timm_kwargs)
        backbone = ViTBackbone(model, _resolved_name(model, name), layer=layer, facet=facet)
    backbone.set_layers_as(layers_as)
    return backbone
