"""Loading a converted official state dict strictly, with every missing, unexpected or ill-shaped tensor named."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import CheckpointMismatchError
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
