"""featlift: denser dense features for pretrained vision backbones (LiFT and friends).

The public API, timm-style; everything else is importable from its module (``featlift.pipeline``, ...)::

    backbone = featlift.create_backbone("vit_small_patch14_dinov2.lvd142m")
    pipeline = featlift.build_pipeline(backbone, upsampler="lift", iters=2)
    features = featlift.extract_features(pipeline, images)
"""

__version__ = "0.1.0"

from .backbones import create_backbone  # noqa: E402
from .checkpoint import load_checkpoint  # noqa: E402
from .errors import (  # noqa: E402
    BackboneError,
    CheckpointError,
    CheckpointMismatchError,
    FeatliftError,
    ImageReadError,
    InputSizeError,
    OutputWriteError,
)
from .extract import extract_to_folder  # noqa: E402
from .extract_tensors import extract_features  # noqa: E402
from .pipeline import build_pipeline  # noqa: E402
from .upsamplers import available_upsamplers, create_upsampler  # noqa: E402

__all__ = [
    "BackboneError",
    "CheckpointError",
    "CheckpointMismatchError",
    "FeatliftError",
    "ImageReadError",
    "InputSizeError",
    "OutputWriteError",
    "available_upsamplers",
    "build_pipeline",
    "create_backbone",
    "create_upsampler",
    "extract_features",
    "extract_to_folder",
    "load_checkpoint",
    "__version__",
]
