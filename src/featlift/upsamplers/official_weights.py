"""Official checkpoints: recognising a method's state dict, and loading a converted one strictly, with every
missing, unexpected or ill-shaped tensor named."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, CheckpointMismatchError
from ..weightfiles import some_of


def load_strictly(module: nn.Module, state: dict[str, torch.Tensor], source: str, method: str) -> None:
    """``module.load_state_dict(state)`` with every missing, unexpected or ill-shaped tensor named."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{key} {list(state[key].shape)} (expected {list(own[key].shape)})"
        for key in own
        if key in state and state[key].shape != own[key].shape
    ]
    if missing or unexpected or shapes:
        parts = [
            f"missing {some_of(missing)}" if missing else "",
            f"unexpected {some_of(unexpected)}" if unexpected else "",
            f"wrong shapes: {some_of(shapes)}" if shapes else "",
        ]
        raise CheckpointMismatchError(
            f"{source}: not a {method} checkpoint of this layout: {'; '.join(p for p in parts if p)}"
        )
    module.load_state_dict(state)


# a key that only one method's official checkpoints have -> the method, for "this looks like ..." hints
TELLTALE_KEYS = {
    "sft_key.gamma.weight": "a JAFAR",
    "key_features_encoder.0.basis": "an AnyUp",
    "upsampler.up1.range_proj.0.weight": "a FeatUp JBU",
}


def check_official_state_dict(obj: Any, source: str, expected: str, signature: tuple[str, ...]) -> dict:
    """`obj` (what `read_weights_file` returned) as a state dict holding every key of `signature`, or
    `CheckpointError` naming `source`, what was `expected`, what was found and, when another method's telltale
    key is there, which method's checkpoint it looks like."""
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        found = (
            f"a dict with keys {some_of([str(k) for k in obj])}"
            if isinstance(obj, dict)
            else type(obj).__name__
        )
        raise CheckpointError(f"{source}: {expected}, found {found}")
    missing = [key for key in signature if key not in obj]
    if missing:
        looks = next((method for key, method in TELLTALE_KEYS.items() if key in obj), None)
        hint = f" (this looks like {looks} checkpoint)" if looks else ""
        raise CheckpointError(
            f"{source}: {expected}; found {len(obj)} tensors without {some_of(missing)}: {some_of(sorted(obj))}{hint}"
        )
    return obj
