"""A timm Vision Transformer tapped at one block and one facet, returning a patch-token map.

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
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import timm
import torch
from torch import nn

from ..errors import BackboneError, InputSizeError
from ..fingerprint import state_dict_fingerprint
from ..weightfiles import read_weights_file, refuse_non_finite, some_of
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


def _build_timm_model(
    name: str, weights: str | os.PathLike | None, pretrained: bool, timm_kwargs: dict | None = None
) -> nn.Module:
    if not timm.is_model(name.split(".")[0]):
        close = difflib.get_close_matches(name.split(".")[0], timm.list_models(), n=8, cutoff=0.6)
        raise BackboneError(f"unknown timm model {name!r}; similar names: {', '.join(close) or 'none'}")
    kwargs = timm_build_kwargs(name, timm_kwargs)
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


@dataclass(frozen=True)
class FeatureShape:
    """What a backbone gives: channels, and the stride (patch size) of its grid in input pixels."""

    channels: int
    stride: int


class ViTBackbone(nn.Module):
    """A frozen timm ViT that maps normalised images ``[B, 3, H, W]`` to ``[B, C, H/p, W/p]`` features.

    ``H`` and ``W`` must be multiples of the patch size ``p``; anything else raises `InputSizeError`
    (resize images first, e.g. with ``featlift.images.image_to_tensor``). Use `normalize` to turn
    ``[0, 1]`` images into the model's input normalisation.

    Example:
        >>> backbone = create_backbone("vit_small_patch14_dinov2.lvd142m", weights="dinov2_s14.safetensors")
        >>> feats = backbone(backbone.normalize(images))  # images in [0, 1]
    """

    def __init__(self, model: nn.Module, name: str, layer: int | None = None, facet: str = "token"):
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
        if layer is None:
            layer = depth - 1
        if not -depth <= layer < depth:
            raise BackboneError(
                f"layer {layer}: {name} has {depth} blocks, so layer must be in 0..{depth - 1} (or -1 for the last)"
            )
        self.model = model.eval().requires_grad_(False)
        self.name = name
        self.layer = layer % depth
        self.facet = facet
        self.depth = depth
        embedding = model.patch_embed if hasattr(model, "patch_embed") else model.embeds  # NaFlexVit: embeds
        patch = embedding.patch_size
        patch = tuple(patch) if isinstance(patch, (tuple, list)) else (patch, patch)
        if patch[0] != patch[1]:
            raise BackboneError(f"{name}: non-square patches {patch} are not supported")
        self.patch_size = int(patch[0])
        self.num_prefix_tokens = int(model.num_prefix_tokens)
        if facet == "token":
            self.channels = int(model.embed_dim)
        else:
            where = f"{name} ({type(model).__name__}): block {self.layer}"
            self.channels = facet_channels(model.blocks[self.layer], facet, where)
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        self.mean = tuple(float(v) for v in cfg.get("mean", (0.485, 0.456, 0.406)))
        self.std = tuple(float(v) for v in cfg.get("std", (0.229, 0.224, 0.225)))
        self.register_buffer("_mean", torch.tensor(self.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(self.std).view(1, 3, 1, 1), persistent=False)
        self._fingerprint: str | None = None

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
        """The token grid for an input of ``height x width`` pixels; both must be multiples of the patch."""
        if height % self.patch_size or width % self.patch_size:
            p = self.patch_size
            raise InputSizeError(
                f"input size {height}x{width} is not a multiple of {self.name}'s patch size {p}; "
                f"resize to e.g. {max(p, round(height / p) * p)}x{max(p, round(width / p) * p)}"
            )
        fixed = fixed_input_size(self.model)
        if fixed is not None and (height, width) != fixed:
            raise InputSizeError(
                f"input size {height}x{width}: {self.name} ({type(self.model).__name__}) takes only "
                f"{fixed[0]}x{fixed[1]} inputs; {fixed_size_advice(self.name)}"
            )
        return height // self.patch_size, width // self.patch_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images ``[B, 3, H, W]`` -> features ``[B, C, H/p, W/p]``."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise InputSizeError(f"expected images of shape [B, 3, H, W], got {list(images.shape)}")
        grid_h, grid_w = self.grid_size(images.shape[-2], images.shape[-1])
        if self.facet == "token":
            (tokens,) = self.model.forward_intermediates(
                images,
                indices=[self.layer],
                norm=True,
                stop_early=True,
                intermediates_only=True,
                output_fmt="NCHW",
            )
            return tokens
        block_input, rope = self._block_input(images)
        facet = attention_facet(self.model.blocks[self.layer], block_input, self.facet, rope=rope)
        facet = facet[:, self.num_prefix_tokens :]
        return facet.transpose(1, 2).reshape(facet.shape[0], -1, grid_h, grid_w)

    def _block_input(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The tokens ``[B, N, C]`` entering block `layer`, prefix tokens included, and the rotary embedding
        the block is called with (``rope=``, Eva; ``None`` for other blocks); later blocks are not run."""
        captured: list[tuple[torch.Tensor, torch.Tensor | None]] = []

        def capture(module: nn.Module, args: tuple, kwargs: dict) -> None:
            tokens = args[0] if args else kwargs["x"]
            captured.append((tokens, kwargs.get("rope", args[1] if len(args) > 1 else None)))
            raise _StopForward

        block = self.model.blocks[self.layer]
        handle = block.register_forward_pre_hook(capture, with_kwargs=True)
        try:
            self.model.forward_intermediates(
                images, indices=[self.layer], stop_early=True, intermediates_only=True
            )
        except _StopForward:
            pass
        finally:
            handle.remove()
        tokens, rope = captured[0]
        if rope is None and uses_rotary_embedding(block) and getattr(self.model, "rope", None) is not None:
            raise BackboneError(f"{self.name}: block {self.layer} was called without its rotary embedding")
        return tokens, rope


def _resolved_name(model: nn.Module, name: str) -> str:
    """`vit_small_patch14_dinov2` -> `vit_small_patch14_dinov2.lvd142m`: the name with timm's default tag."""
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    arch, tag = cfg.get("architecture"), cfg.get("tag")
    if arch and tag and name.split(".")[0] == arch:
        return f"{arch}.{tag}"
    return name


def create_backbone(
    name: str,
    *,
    weights: str | os.PathLike | None = None,
    layer: int | None = None,
    facet: str = "token",
    pretrained: bool = True,
    **timm_kwargs,
) -> ViTBackbone:
    """Build a frozen, eval-mode `ViTBackbone` from a timm model name.

    Args:
        name: any timm ViT, e.g. ``vit_small_patch14_dinov2.lvd142m``, ``vit_base_patch8_224.dino``,
            ``vit_base_patch16_clip_224.openai``.
        weights: a local .safetensors/.pth file (timm, DINO or DINOv2 layout). Without it, timm downloads
            the pretrained weights (needs internet) unless ``pretrained=False`` (random weights).
        layer: block index, 0-based; negative counts from the end; default the last block.
        facet: ``token``, ``query``, ``key`` or ``value``.
        timm_kwargs: passed on to ``timm.create_model`` (e.g. ``img_size``, or ``depth`` for a shallow copy).
    """
    if facet not in FACETS:
        raise BackboneError(f"facet {facet!r}: expected one of {', '.join(FACETS)}")
    model = _build_timm_model(name, weights, pretrained, timm_kwargs)
    return ViTBackbone(model, _resolved_name(model, name), layer=layer, facet=facet)
