"""ViT backbones: any timm Vision Transformer, tapped at one block and one facet."""

from . import mirl as mirl  # registers MIRL's deep ViTs with timm
from .vit import FACETS, ViTBackbone, create_backbone, load_weights_file

__all__ = ["FACETS", "ViTBackbone", "create_backbone", "load_weights_file"]
