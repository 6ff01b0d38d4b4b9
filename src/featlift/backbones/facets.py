"""Query, key and value of a timm ViT block: exactly the tensors its attention computes with.

For block input tokens ``x [B, N, C]`` the attention module receives ``a = norm1(x)`` (pre-norm blocks:
timm's ``Block``, ``EvaBlock`` and BEiT's ``Block``) or ``a = x`` (post-norm blocks: ``ResPostBlock``,
``EvaBlockPostNorm``). From ``a`` each facet is, per head:

- the projection with the bias the module applies: the fused ``qkv`` linear's own bias, or the separate
  ``q_bias`` / ``k_bias`` / ``v_bias`` of BEiT and Eva (EVA02, DINOv3), or the separate ``q_proj`` /
  ``k_proj`` / ``v_proj`` linears of unfused Eva attention;
- for query and key, then the module's ``q_norm`` / ``k_norm`` (identity in most ViTs);
- for query and key of rotary attention (Eva's ``EvaAttention``, timm's ``AttentionRope``: DINOv3, EVA02,
  PE, the rope ViTs), then the rotary position embedding the block was called with (``rope=``), applied to
  the patch tokens after the module's ``num_prefix_tokens``, in the module's layout (interleaved pairs or
  rotated halves).

Heads are concatenated head-major into ``heads * head_dim`` channels. With grouped-query attention the
key and value have the module's ``num_kv_heads`` heads (each shared by a group of query heads).

Attention scores are ``softmax(q k^T * attn.scale + bias)`` per head, where BEiT adds its relative position
bias; that bias is not part of any facet. Attention modules and blocks of other classes are refused by
class (`BackboneError`), never guessed at.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from timm.layers import Attention, AttentionRope
from timm.models.beit import Attention as BeitAttention
from timm.models.beit import Block as BeitBlock
from timm.models.eva import EvaAttention, EvaBlock, EvaBlockPostNorm
from timm.models.vision_transformer import Block, ResPostBlock
from torch import nn

from ..errors import BackboneError

ATTENTION_FACETS = ("query", "key", "value")

# What the attention module of each block class receives from the block input.
_PRE_NORM_BLOCKS = (Block, EvaBlock, BeitBlock)
_POST_NORM_BLOCKS = (ResPostBlock, EvaBlockPostNorm)
# Attention modules whose query/key/value featlift computes (exact classes: a subclass may compute otherwise).
_ROTARY_ATTENTIONS = (EvaAttention, AttentionRope)
_ATTENTIONS = (Attention, BeitAttention, *_ROTARY_ATTENTIONS)


def _class_names(classes: tuple[type, ...]) -> str:
    return ", ".join(f"{cls.__module__}.{cls.__qualname__}" for cls in classes)


def check_attention_tappable(block: nn.Module, where: str = "this block") -> None:
    """Refuse a block whose query/key/value featlift does not know how to compute, naming its class."""
    if type(block) not in _PRE_NORM_BLOCKS + _POST_NORM_BLOCKS:
        raise BackboneError(
            f"{where} is a {type(block).__module__}.{type(block).__qualname__}, whose query/key/value featlift "
            f"cannot tap; supported blocks: {_class_names(_PRE_NORM_BLOCKS + _POST_NORM_BLOCKS)}. "
            "Use facet 'token'"
        )
    attn = getattr(block, "attn", None)
    if type(attn) not in _ATTENTIONS:
        found = "no `attn`" if attn is None else f"a {type(attn).__module__}.{type(attn).__qualname__}"
        raise BackboneError(
            f"{where} has {found} as attention, whose query/key/value featlift cannot tap; supported attention "
            f"modules: {_class_names(_ATTENTIONS)}. Use facet 'token'"
        )


def uses_rotary_embedding(block: nn.Module) -> bool:
    """Whether the block's attention rotates query and key by a ``rope`` tensor the block is called with."""
    return type(getattr(block, "attn", None)) in _ROTARY_ATTENTIONS


def facet_channels(block: nn.Module, facet: str, where: str = "this block") -> int:
    """Channels of `facet` for `block`: ``heads * head_dim`` (key/value: the key/value heads)."""
    _check_facet(facet)
    check_attention_tappable(block, where)
    attn = block.attn
    heads = _head_counts(attn)[ATTENTION_FACETS.index(facet)]
    return heads * _head_dim(attn)


def attention_facet(
    block: nn.Module, tokens: torch.Tensor, facet: str, *, rope: torch.Tensor | None = None
) -> torch.Tensor:
    """Query, key or value of a timm ViT block for its input ``tokens [B, N, C]`` -> ``[B, N, heads*head_dim]``.

    `rope` must be the rotary embedding the block is called with (its ``rope=`` argument: Eva models with a
    ``rope`` module, e.g. DINOv3 and EVA02), ``None`` when it is called without one; a block whose attention
    applies no rotary embedding refuses one.
    """
    _check_facet(facet)
    check_attention_tappable(block)
    attn = block.attn
    if rope is not None and type(attn) not in _ROTARY_ATTENTIONS:
        raise BackboneError(
            f"a {type(attn).__qualname__} block applies no rotary embedding, but rope was given"
        )
    inputs = block.norm1(tokens) if type(block) in _PRE_NORM_BLOCKS else tokens
    heads = _project(attn, inputs, facet)  # [B, heads, N, head_dim]
    projection_dtype = heads.dtype
    if facet == "query":
        heads = attn.q_norm(heads) if hasattr(attn, "q_norm") else heads
    elif facet == "key":
        heads = attn.k_norm(heads) if hasattr(attn, "k_norm") else heads
    if facet != "value" and rope is not None:
        rotated = _rotate_patch_tokens(
            heads, rope, attn.num_prefix_tokens, getattr(attn, "rotate_half", False)
        )
        heads = rotated.to(projection_dtype)  # as timm casts rotated q/k to v's dtype (under autocast: v's)
    batch, count = tokens.shape[:2]
    return heads.transpose(1, 2).reshape(batch, count, -1)


def _check_facet(facet: str) -> None:
    if facet not in ATTENTION_FACETS:
        raise BackboneError(f"facet {facet!r} is not an attention facet ({', '.join(ATTENTION_FACETS)})")


def _head_counts(attn: nn.Module) -> tuple[int, int, int]:
    kv_heads = int(getattr(attn, "num_kv_heads", attn.num_heads))
    return int(attn.num_heads), kv_heads, kv_heads


def _head_dim(attn: nn.Module) -> int:
    if isinstance(getattr(attn, "head_dim", None), int):
        return attn.head_dim
    return attn.qkv.out_features // 3 // attn.num_heads  # BEiT keeps no head_dim attribute


def _project(attn: nn.Module, inputs: torch.Tensor, facet: str) -> torch.Tensor:
    """The facet's linear projection of the attention input, with the bias the module adds, per head."""
    index = ATTENTION_FACETS.index(facet)
    heads = _head_counts(attn)[index]
    if getattr(attn, "qkv", None) is not None:
        width = attn.qkv.out_features // 3
        rows = slice(index * width, (index + 1) * width)
        weight, bias = attn.qkv.weight[rows], attn.qkv.bias
        bias = None if bias is None else bias[rows]
        separate_bias = _separate_bias(attn, facet)
        if separate_bias is not None:  # BEiT / Eva: the fused linear has no bias; q/k/v biases are kept apart
            bias = separate_bias if bias is None else bias + separate_bias
        projected = nn.functional.linear(inputs, weight, bias)
    else:
        projected = getattr(attn, ("q_proj", "k_proj", "v_proj")[index])(inputs)
    batch, count = inputs.shape[:2]
    return projected.reshape(batch, count, heads, -1).transpose(1, 2)


def _separate_bias(attn: nn.Module, facet: str) -> torch.Tensor | None:
    if getattr(attn, "q_bias", None) is None:
        return None
    return {"query": attn.q_bias, "key": attn.k_bias, "value": attn.v_bias}[facet]


def _swap_interleaved_pairs(x: torch.Tensor) -> torch.Tensor:
    """``[x0, x1, x2, x3, ...] -> [-x1, x0, -x3, x2, ...]``: rotation by 90 degrees in each (even, odd) pair."""
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((-odd, even), dim=-1).flatten(-2)


def _swap_halves(x: torch.Tensor) -> torch.Tensor:
    """``[first half, second half] -> [-second half, first half]``: the same rotation, halves layout."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def _rotate_patch_tokens(
    heads: torch.Tensor, rope: torch.Tensor, prefix_tokens: int, rotate_half: bool
) -> torch.Tensor:
    """Rotary position embedding of the patch tokens of ``heads [B, h, N, d]``; prefix tokens stay as they are.

    `rope` holds ``[sin | cos]`` on its last axis (``2d``), one row per patch token: ``x cos + R(x) sin``,
    where ``R`` rotates each pair of channels by 90 degrees (pairs interleaved, or first/second halves).
    """
    swap: Callable[[torch.Tensor], torch.Tensor] = _swap_halves if rotate_half else _swap_interleaved_pairs
    sin, cos = rope.chunk(2, dim=-1)
    patches = heads[:, :, prefix_tokens:]
    if sin.shape[-2] != patches.shape[-2] or sin.shape[-1] != patches.shape[-1]:
        raise BackboneError(
            f"rotary embedding of shape {list(rope.shape)} does not fit {patches.shape[-2]} patch tokens of "
            f"{patches.shape[-1]} channels per head"
        )
    rotated = (patches * cos + swap(patches) * sin).to(heads.dtype)
    return torch.cat((heads[:, :, :prefix_tokens], rotated), dim=2)
