"""Checkpoint layouts of other ViT code bases -> the timm layout that `timm.create_model` loads.

- MAE (facebookresearch/mae) and the code bases built on it (MIRL's PyTorch checkpoints): the encoder's
  key names are timm's already, but a pre-training checkpoint also holds the MAE decoder (``decoder_*``)
  and the decoder's ``mask_token``, and a global-pool fine-tuned checkpoint has ``fc_norm`` (the norm of
  the pooled tokens) instead of the final ``norm``. The decoder and mask token are dropped; ``fc_norm``
  becomes ``norm`` when there is no ``norm``, so the token facet is normalised by the model's only final
  norm. (timm itself would mistake a file with ``mask_token`` for DINOv2 and convert it as one.)
- PaddlePaddle (MIRL's ``.pd`` / ``.pdparams``, read by `featlift.restricted_pickle`): a dict of numpy
  arrays, or of ``(name, array)`` records as ``paddle.save`` writes tensors, possibly inside a training
  checkpoint ``{"model": ..., "optimizer": ..., "epoch": ...}``. MIRL's Paddle ViT uses timm's module
  names, so the keys map one to one; what differs is that a Paddle ``Linear`` stores its weight as
  ``[in, out]`` (PyTorch: ``[out, in]``), so the weights of the known Linear layers (``attn.qkv``,
  ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``, ``head``) are transposed, chosen by name (a square
  ``attn.proj`` weight cannot be told by its shape, and embeddings must not be touched). A 2-D ``weight``
  of any other module is refused rather than guessed. Conv kernels (``patch_embed.proj.weight``) have the
  same layout in both. MIRL's pre-training extras are dropped: its six decoders (``decoder_*``), their
  mask tokens (``mask_token0`` ...), and the norms of its intermediate decoder inputs (``norm_low``,
  ``norm0`` ... ``norm4``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy
import torch

from ..errors import BackboneError
from ..weightfiles import some_of

# Keys only pre-training uses: MAE's and MIRL's decoders and mask tokens, MIRL's decoder-input norms.
_PRETRAINING_ONLY = re.compile(r"^(decoder_|mask_token\d*$|norm_low\.|norm\d+\.)")
# The Linear layers of a (MIRL / PLSC / timm) ViT, by module name: their Paddle weight is [in, out].
_LINEAR_WEIGHT = re.compile(r"^(blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))|head0?)\.weight$")
# Paddle bookkeeping entries of a state dict, not tensors.
_PADDLE_STRUCTURE_KEY = "StructuredToParameterName@@"
_PADDLE_SPLIT_KEY = "UnpackBigParamInfor@@"
_PADDLE_WRAPPER_PREFIX = "_layers."  # paddle.DataParallel


def is_mae_layout(state: Mapping[str, Any]) -> bool:
    """Whether `state` (timm key names) holds MAE's decoder or a global-pool ``fc_norm`` without ``norm``."""
    has_decoder = any(key.startswith("decoder_") for key in state)
    fc_norm_only = (
        "fc_norm.weight" in state and "norm.weight" not in state and "blocks.0.attn.qkv.weight" in state
    )
    return has_decoder or fc_norm_only


def drop_pretraining_parts(state: Mapping[str, Any]) -> dict[str, Any]:
    """`state` without MAE/MIRL decoder tensors and mask tokens, with ``fc_norm`` as ``norm`` if no ``norm``."""
    kept = {key: value for key, value in state.items() if not _PRETRAINING_ONLY.match(key)}
    if "norm.weight" not in kept and "fc_norm.weight" in kept:
        for part in ("weight", "bias"):
            if f"fc_norm.{part}" in kept:
                kept[f"norm.{part}"] = kept.pop(f"fc_norm.{part}")
    return kept


def mae_layout_to_timm(state: Mapping[str, Any]) -> dict[str, Any]:
    """An MAE-layout state dict in timm layout; any other state dict is returned unchanged (as a dict)."""
    return drop_pretraining_parts(state) if is_mae_layout(state) else dict(state)


def _paddle_state_dict(loaded: Any, source: str) -> Mapping[str, Any]:
    """The model state dict inside what a Paddle checkpoint unpickled to."""
    if not isinstance(loaded, Mapping):
        raise BackboneError(
            f"{source}: expected a PaddlePaddle state dict (a dict), found {type(loaded).__name__}"
        )
    model = loaded.get("model")
    state = model if isinstance(model, Mapping) else loaded
    if _PADDLE_SPLIT_KEY in state:
        raise BackboneError(
            f"{source}: holds tensors that paddle.save split into slices ({_PADDLE_SPLIT_KEY}); featlift does not "
            "join them. Save the state dict with pickle protocol 4 (paddle.save(state, path, protocol=4))"
        )
    return state


def _paddle_array(value: Any) -> numpy.ndarray | None:
    """The array of a state-dict value: an array, or paddle.save's ``(name, array)`` tensor record."""
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str):
        value = value[1]
    return value if isinstance(value, numpy.ndarray) else None


def _array_to_tensor(array: numpy.ndarray) -> torch.Tensor:
    """A torch tensor owning a native-byte-order copy; uint16 is Paddle's storage of bfloat16."""
    array = numpy.ascontiguousarray(array.astype(array.dtype.newbyteorder("="), copy=False))
    if not array.flags.writeable:
        array = array.copy()
    if array.dtype == numpy.uint16:
        return torch.from_numpy(array.view(numpy.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def paddle_layout_to_timm(loaded: Any, source: str) -> dict[str, torch.Tensor]:
    """A PaddlePaddle ViT checkpoint (what `restricted_pickle.load_array_pickle` returned) in timm layout.

    Raises `BackboneError` naming `source` for an entry that is not an array, and for a 2-D ``weight``
    whose module is not a known Linear layer (transposing it or not would be a guess).
    """
    state = _paddle_state_dict(loaded, source)
    tensors: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key == _PADDLE_STRUCTURE_KEY:
            continue
        if not isinstance(key, str):
            raise BackboneError(f"{source}: state dict key {key!r} is not a string")
        array = _paddle_array(value)
        if array is None:
            raise BackboneError(
                f"{source}: entry {key!r} is a {type(value).__name__}, not an array; expected a PaddlePaddle "
                "state dict of tensors (or a checkpoint holding one under 'model')"
            )
        if key.startswith(_PADDLE_WRAPPER_PREFIX):
            key = key[len(_PADDLE_WRAPPER_PREFIX) :]
        tensors[key] = _array_to_tensor(array)
    tensors = drop_pretraining_parts(tensors)
    unknown_matrices = [
        key
        for key, value in tensors.items()
        if value.ndim == 2 and key.endswith(".weight") and not _LINEAR_WEIGHT.match(key)
    ]
    if unknown_matrices:
        raise BackboneError(
            f"{source}: 2-D weights of modules featlift does not know: {some_of(unknown_matrices)}; a Paddle "
            "Linear weight is [in, out] and must be transposed, other 2-D weights not, and featlift will not "
            "guess which these are. Known Linear layers: blocks.N.attn.qkv/proj, blocks.N.mlp.fc1/fc2, head"
        )
    return {
        key: value.t().contiguous() if _LINEAR_WEIGHT.match(key) and value.ndim == 2 else value
        for key, value in tensors.items()
    }
