"""Official checkpoints of other upsamplers (JAFAR, AnyUp, FeatUp's JBU stack) as featlift checkpoints.

Each method's module converts its own official file (``from_official(obj, source)``: the loaded object, with
its outer layout, to the module with the weights loaded) and names the backbone the file was trained for
(``OFFICIAL_BACKBONE``, a timm name, or ``"any"``). This module reads the file without unpickling
(``torch.load(weights_only=True)``), builds the featlift checkpoint around the converted module and records
where it came from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from .backbones import Backbone, create_backbone
from .checkpoint import BackboneSpec, CheckpointConfig, read_checkpoint_config, save_checkpoint
from .errors import CheckpointError, CheckpointMismatchError, FeatliftError
from .upsamplers import Upsampler, get_upsampler_class
from .weightfiles import read_weights_file, refuse_non_finite

IMAGENET_NORMALIZATION = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
"""The guide normalisation recorded for weights that serve any backbone (AnyUp's README asks for ImageNet's)."""


@dataclass(frozen=True)
class Peer:
    """An upsampler featlift can import official checkpoints of: its featlift name and where it comes from."""

    upsampler: str
    paper: str
    repository: str
    license: str


PEERS = {
    "jafar": Peer(
        "jafar", "Couairon et al., JAFAR, NeurIPS 2025", "github.com/PaulCouairon/JAFAR", "Apache-2.0"
    ),
    "anyup": Peer(
        "anyup",
        "Wimmer et al., AnyUp: Universal Feature Upsampling, ICLR 2026",
        "github.com/wimmerth/anyup",
        "CC-BY-4.0",
    ),
    "featup": Peer(
        "featup-jbu", "Fu et al., FeatUp, ICLR 2024 (JBU stack)", "github.com/mhamilton723/FeatUp", "MIT"
    ),
}


def peer(method: str) -> Peer:
    if method not in PEERS:
        raise FeatliftError(f"unknown peer method {method!r}: featlift imports {', '.join(PEERS)}")
    return PEERS[method]


def official_backbone(method: str) -> str:
    """The timm name of the backbone `method`'s official checkpoint was trained for, or ``"any"``."""
    return _method_module(peer(method).upsampler).OFFICIAL_BACKBONE


def _method_module(upsampler: str):
    return sys.modules[get_upsampler_class(upsampler).__module__]


def read_official(method: str, path: str | os.PathLike) -> Upsampler:
    """The official checkpoint file of `method` converted to featlift's module (eval mode), without unpickling.

    A file of another method or shape is refused with `CheckpointError` naming the file and what was expected.
    """
    path = Path(path)
    info = peer(method)
    loaded = read_weights_file(path, CheckpointError, what=f"{method} checkpoint")
    module = _method_module(info.upsampler).from_official(loaded, str(path))
    refuse_non_finite(module.state_dict(), f"{method} checkpoint {path}", CheckpointError)
    return module.eval()


def import_peer(
    method: str, path: str | os.PathLike, directory: str | os.PathLike, backbone: Backbone | None = None
) -> tuple[Upsampler, CheckpointConfig]:
    """Convert `method`'s official checkpoint at `path` into a featlift checkpoint folder `directory`.

    The checkpoint records the backbone the file was trained for: `backbone` when given (with the fingerprint
    of its weights: you vouch that these are the weights it was trained with), else the method's official
    backbone built without weights (fingerprint left empty: featlift never saw those weights, so other
    weights for the same backbone name load without a warning), or ``"any"`` for a feature-agnostic method.
    """
    path = Path(path)
    info = peer(method)
    module = read_official(method, path)
    trained_for = official_backbone(method)
    if backbone is not None:
        spec, normalization = BackboneSpec.of(backbone), backbone.normalization
    elif trained_for == "any":
        spec, normalization = BackboneSpec.any(), IMAGENET_NORMALIZATION
    else:  # the official backbone's architecture and normalisation, without its weights
        official = create_backbone(trained_for, pretrained=False)
        spec, normalization = (
            dataclasses.replace(BackboneSpec.of(official), fingerprint=""),
            official.normalization,
        )
    if backbone is not None and module.capabilities.backbones != "any":
        channels = getattr(module, "channels", None)
        if channels is not None and channels != backbone.channels:
            raise CheckpointMismatchError(
                f"{path} is a {method} checkpoint for {channels}-channel features, but {backbone.name} layer "
                f"{backbone.layer} facet {backbone.facet} gives {backbone.channels}"
            )
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    training = {
        "imported_from": str(path),
        "source": f"official {info.paper} checkpoint ({info.repository})",
        "source_sha256": digest,
        "license": info.license,
        "trained_for": trained_for if backbone is None else backbone.name,
    }
    save_checkpoint(directory, module, spec, training=training, normalization=normalization)
    return module, read_checkpoint_config(directory)
