"""Reading the official peers' reference outputs in ../shared/peers (see its README.md) and comparing a map to
them: each case stores 256 sampled pixels (``.yx`` -> ``.pixels``) and the whole map's per-channel ``.mean``
and ``.std`` of the official output."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from conftest import SHARED

from featlift.errors import CheckpointError
from featlift.weightfiles import read_weights_file

REFERENCE = SHARED / "peers" / "reference"
PEER_WEIGHTS = SHARED / "weights" / "peers"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

RELATIVE_TOLERANCE = 1e-5
"""Allowed |featlift - official| over the largest |official| sampled value of a case, for pixels, channel means
and standard deviations: ~1e-4 absolute on these outputs (values up to ~11), the float32 noise floor the
README measured between thread counts (2.7e-5)."""


def requires_peer(*names: str):
    """Skip unless ../shared/peers holds these files (paths relative to ../shared)."""
    missing = [name for name in names if not (SHARED / name).is_file()]
    return pytest.mark.skipif(bool(missing), reason=f"{', '.join(missing)} not found in {SHARED}")


def official_checkpoint(name: str):
    path = PEER_WEIGHTS / name
    return read_weights_file(path, CheckpointError, what="official checkpoint"), str(path)


def reference_cases(method: str) -> list[str]:
    """The case names (``beagle.out_32x32`` ...) of ``reference/<method>.safetensors``, empty when absent."""
    path = REFERENCE / f"{method}.safetensors"
    if not path.is_file():
        return []
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return sorted({key.rsplit(".", 1)[0] for key in handle.keys()})


def load(method: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(REFERENCE / f"{method}.safetensors"))


def case_inputs(case: str) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """``(features, guide, (H, W))`` of a case, the guide normalised from the stored uint8 image as the
    README says (bit for bit the tensor the official code was given)."""
    image, size = case.split(".out_")
    height, width = (int(s) for s in size.split("x"))
    inputs = load("inputs")
    side = 448 if f"{image}.features_448" in inputs and height == 448 else 224
    pixels = inputs[f"{image}.image_{side}_uint8"].float() / 255
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    return inputs[f"{image}.features_{side}"], (pixels - mean) / std, (height, width)


@dataclass
class Agreement:
    pixels: float  # max |diff| at the sampled pixels
    mean: float  # max |diff| of the per-channel means
    std: float  # max |diff| of the per-channel standard deviations
    scale: float  # max |official| at the sampled pixels

    @property
    def relative(self) -> float:
        return max(self.pixels, self.mean, self.std) / self.scale


def agreement(output: torch.Tensor, reference: dict[str, torch.Tensor], case: str) -> Agreement:
    """How `output` ``[1, C, H, W]`` compares with the stored official output of `case`."""
    out = output[0].float()
    yx = reference[f"{case}.yx"].long()
    sampled = out[:, yx[:, 0], yx[:, 1]].T
    official = reference[f"{case}.pixels"]
    return Agreement(
        pixels=float((sampled - official).abs().max()),
        mean=float((out.mean(dim=(1, 2)) - reference[f"{case}.mean"]).abs().max()),
        std=float((out.std(dim=(1, 2)) - reference[f"{case}.std"]).abs().max()),
        scale=float(official.abs().max()),
    )


def assert_matches_reference(output: torch.Tensor, reference: dict[str, torch.Tensor], case: str) -> None:
    assert output.shape[-2:] == tuple(int(s) for s in case.split(".out_")[1].split("x"))
    found = agreement(output, reference, case)
    assert found.relative <= RELATIVE_TOLERANCE, f"{case}: {found} (relative {found.relative:.2e})"
