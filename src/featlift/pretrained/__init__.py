"""Upsampler checkpoints shipped inside the package, one folder each (model.safetensors + config.json)."""

from __future__ import annotations

from pathlib import Path

from ..checkpoint import read_checkpoint_config

PRETRAINED_DIR = Path(__file__).resolve().parent


def shipped_checkpoints() -> list[Path]:
    return sorted(
        p.parent for p in PRETRAINED_DIR.glob("*/config.json") if (p.parent / "model.safetensors").is_file()
    )


def find_shipped_checkpoint(backbone: str, layer: int, facet: str, upsampler: str = "lift") -> Path | None:
    """The shipped checkpoint trained for this backbone name, layer, facet and upsampler, if any."""
    for directory in shipped_checkpoints():
        config = read_checkpoint_config(directory)
        spec = config.backbone
        if (spec.name, spec.layer, spec.facet, config.upsampler) == (backbone, layer, facet, upsampler):
            return directory
    return None
