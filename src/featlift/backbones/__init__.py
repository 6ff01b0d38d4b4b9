"""ViT backbones: any timm Vision Transformer, tapped at one block and one facet."""

from .vit import FACETS, ViTBackbone, create_backbone, load_weights_file

__all__ = ["FACETS", "ViTBackbone", "create_backbone", "load_weights_file"]
