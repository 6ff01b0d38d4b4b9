"""Checkpoints of the original LiFT code (bare ``.pth`` state dicts) converted into featlift checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

from .backbones import ViTBackbone
from .checkpoint import CheckpointConfig, read_checkpoint_config, save_checkpoint
from .errors import CheckpointError, CheckpointMismatchError
from .upsamplers.lift import LiFT, convert_original_state_dict
from .weightfiles import read_weights_file, refuse_non_finite


def import_original_lift(
    pth: str | os.PathLike, backbone: ViTBackbone, directory: str | os.PathLike
) -> tuple[LiFT, CheckpointConfig]:
    """Convert a checkpoint of the original LiFT code (a bare state dict) into featlift's format.

    The original files record nothing about their backbone, so `backbone` (with its layer and facet)
    must be the one the file was trained for; channel count and shapes are checked against it.
    """
    pth = Path(pth)
    state = read_weights_file(pth, CheckpointError, what="LiFT file")
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{pth}: expected a LiFT state dict, found {type(state).__name__}")
    refuse_non_finite(state, f"LiFT file {pth}", CheckpointError)
    state = convert_original_state_dict(state)
    head = state.get("head.weight")
    if head is None:
        raise CheckpointError(
            f"{pth}: not a LiFT state dict (no outc.weight); keys start {sorted(state)[:5]}"
        )
    if head.shape[0] != backbone.channels:
        raise CheckpointMismatchError(
            f"{pth} outputs {head.shape[0]} channels, but {backbone.name} layer {backbone.layer} facet "
            f"{backbone.facet} gives {backbone.channels}"
        )
    module = LiFT(channels=backbone.channels, patch_size=backbone.patch_size, residual=False)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{pth}: does not fit the LiFT architecture: {exc}") from exc
    save_checkpoint(
        directory, module, backbone, training={"imported_from": str(pth), "source": "original LiFT code"}
    )
    return module.eval(), read_checkpoint_config(directory)
