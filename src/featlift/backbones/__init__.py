"""Backbones: any timm Vision Transformer tapped at one or several blocks and one facet
(`ViTBackbone`), or a timm CNN tapped at one stage (`CNNBackbone`); both are a `Backbone`."""

from . import mirl as mirl  # registers MIRL's deep ViTs with timm
from .base import LAYERS_AS, Backbone
from .cnn import CNNBackbone
from .vit import FACETS, ViTBackbone, create_backbone, load_weights_file

__all__ = [
    "FACETS",
    "LAYERS_AS",
    "Backbone",
    "CNNBackbone",
    "ViTBackbone",
    "create_backbone",
    "load_weights_file",
]
