"""Content fingerprints of model weights: which weights a checkpoint or a feature file came from."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

import torch


def state_dict_fingerprint(state: Mapping[str, torch.Tensor], config: Mapping | None = None) -> str:
    """First 16 hex digits of a SHA-256 over the tensors' names, dtypes, shapes and values, and over
    `config` (constructor arguments that change outputs too, e.g. an upsampler's ``output_scale``)."""
    digest = hashlib.sha256()
    if config:
        digest.update(json.dumps(dict(config), sort_keys=True).encode())
    for key, tensor in sorted(state.items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
