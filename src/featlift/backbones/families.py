"""What differs between the timm ViT families featlift builds: constructor keywords and input sizes.

- Most families (timm's ``VisionTransformer``, Eva: DINOv3, EVA02, PE) are built with
  ``dynamic_img_size=True``, so they take any input that is a multiple of the patch, resizing their absolute
  position embedding (if any) to the token grid.
- ``NaFlexVit`` (``naflexvit_*``: RADIO, SigLIP2 NaFlex) always takes any size and refuses the keyword.
- BEiT (``beit_*``, ``beitv2_*``) refuses it too: its relative position bias is learned for the token grid of
  its ``img_size``, so it takes only that input size.
- The classic ``vit_*_radio_*`` ports are built at their fixed ``img_size``: their position embedding is
  resampled from RADIO's 128x128 grid when the weights load, and resizing it again per input (what
  ``dynamic_img_size`` does) is not what RADIO computes; ``naflexvit_*_radio_*`` resizes it as RADIO does.

A keyword the caller passes wins over these defaults.
"""

from __future__ import annotations

import timm.models
from torch import nn

_NO_DYNAMIC_SIZE_MODULES = ("timm.models.naflexvit", "timm.models.beit")


def _entrypoint_module(name: str) -> str:
    architecture = name.split(".")[0]
    try:
        return timm.models.model_entrypoint(architecture).__module__
    except (KeyError, RuntimeError):  # an unknown name: the builder reports it
        return ""


def timm_build_kwargs(name: str, user_kwargs: dict | None = None) -> dict:
    """Keywords for ``timm.create_model(name, ...)``: no classifier, the family's size handling, then the caller's."""
    kwargs: dict = {"num_classes": 0}
    module = _entrypoint_module(name)
    if module not in _NO_DYNAMIC_SIZE_MODULES:
        kwargs["dynamic_img_size"] = not (module == "timm.models.vision_transformer" and "radio" in name)
    kwargs.update(user_kwargs or {})
    return kwargs


def fixed_input_size(model: nn.Module) -> tuple[int, int] | None:
    """The one input size ``(H, W)`` a model takes, or ``None`` when it takes any multiple of the patch."""
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is None or not getattr(patch_embed, "strict_img_size", False):
        return None
    size = getattr(patch_embed, "img_size", None)
    return None if size is None else (int(size[0]), int(size[1]))


def fixed_size_advice(name: str) -> str:
    """How to get another input size from a model that takes one size only."""
    advice = "build it for another size with img_size=(H, W) (a create_backbone keyword, passed on to timm)"
    if "radio" in name and not name.startswith("naflexvit_"):
        advice += f", or use naflexvit_{name.split('vit_', 1)[-1]}, which resizes RADIO's position embedding as RADIO does"
    return advice
