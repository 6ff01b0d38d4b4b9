"""MIRL's deep Vision Transformers (Huang et al., NeurIPS 2023) as timm models.

"Masked Image Residual Learning for Scaling Deeper Vision Transformers" (github.com/russellllaputa/MIRL)
pre-trains deeper, narrower ViTs. Their configurations in MIRL's ``models_vit.py``
(``vit_small_depth54_patch16``, ``vit_base_depth48_patch16``, ``vit_base_depth24_patch16``) are plain
MAE / timm ViTs: patch 16, a class token, learned-shape (fixed sin-cos at pre-training) position
embeddings, qkv bias, MLP ratio 4, LayerNorm eps 1e-6, pre-norm blocks, no layer scale, no registers.
They are registered here with timm's `register_model`, so `timm.create_model` and featlift's
`create_backbone` both take these names (importing `featlift.backbones` registers them):

- ``mirl_vit_small_depth54_patch16``: ViT-S-54, embed 384, depth 54, 12 heads;
- ``mirl_vit_base_depth48_patch16``: ViT-B-48, embed 768, depth 48, 12 heads;
- ``mirl_vit_base_depth24_patch16``: ViT-B-24, embed 768, depth 24, 12 heads.

MIRL publishes its checkpoints as Baidu Pan share links (PaddlePaddle ``.pd`` files, and one PyTorch
conversion of ViT-B-48), not as downloadable URLs, so no pretrained URL is set: pass the file with
``--weights FILE`` (``weights=FILE``); asking for pretrained weights without one is refused instead of
silently building random weights. Inputs use the ImageNet mean / std, as MIRL's (MAE's) data pipeline.
"""

from __future__ import annotations

from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import register_model
from timm.models._registry import generate_default_cfgs
from timm.models.vision_transformer import VisionTransformer, _create_vision_transformer

from ..errors import BackboneError

MIRL_REPOSITORY = "https://github.com/russellllaputa/MIRL"

# name -> (embed_dim, depth, num_heads); patch 16 for all
MIRL_PRESETS: dict[str, tuple[int, int, int]] = {
    "mirl_vit_small_depth54_patch16": (384, 54, 12),
    "mirl_vit_base_depth48_patch16": (768, 48, 12),
    "mirl_vit_base_depth24_patch16": (768, 24, 12),
}


def _mirl_cfg() -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "fixed_input_size": True,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "see " + MIRL_REPOSITORY,
        "paper_ids": "arXiv:2309.14136",
        "paper_name": "Masked Image Residual Learning for Scaling Deeper Vision Transformers",
        "origin_url": MIRL_REPOSITORY,
    }


default_cfgs = generate_default_cfgs({name: _mirl_cfg() for name in MIRL_PRESETS})


def _has_local_weights(overlay: Any) -> bool:
    return isinstance(overlay, dict) and (overlay.get("state_dict") is not None or bool(overlay.get("file")))


def _create_mirl_vit(name: str, pretrained: bool, **kwargs: Any) -> VisionTransformer:
    if pretrained and not _has_local_weights(kwargs.get("pretrained_cfg_overlay")):
        raise BackboneError(
            f"{name}: MIRL publishes no downloadable weights (its checkpoints are Baidu Pan links in the README "
            f"of {MIRL_REPOSITORY}); download one and pass it with --weights FILE (weights=FILE in Python), "
            "or build random weights with pretrained=False"
        )
    embed_dim, depth, num_heads = MIRL_PRESETS[name]
    model_args = dict(
        patch_size=16, embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=4.0, qkv_bias=True
    )
    return _create_vision_transformer(name, pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def mirl_vit_small_depth54_patch16(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """MIRL ViT-S-54: embed 384, depth 54, 12 heads, patch 16."""
    return _create_mirl_vit("mirl_vit_small_depth54_patch16", pretrained, **kwargs)


@register_model
def mirl_vit_base_depth48_patch16(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """MIRL ViT-B-48: embed 768, depth 48, 12 heads, patch 16."""
    return _create_mirl_vit("mirl_vit_base_depth48_patch16", pretrained, **kwargs)


@register_model
def mirl_vit_base_depth24_patch16(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """MIRL ViT-B-24: embed 768, depth 24, 12 heads, patch 16."""
    return _create_mirl_vit("mirl_vit_base_depth24_patch16", pretrained, **kwargs)
