"""featlift: denser dense features for pretrained Vision Transformers (LiFT and friends)."""

__version__ = "0.1.0"

from .backbones import FACETS, ViTBackbone, create_backbone  # noqa: E402
from .checkpoint import (  # noqa: E402
    BackboneSpec,
    CheckpointConfig,
    import_original_lift,
    load_checkpoint,
    read_checkpoint_config,
    save_checkpoint,
)
from .errors import (  # noqa: E402
    BackboneError,
    CheckpointError,
    CheckpointMismatchError,
    FeatliftError,
    ImageReadError,
    InputSizeError,
)
from .extract import ExtractionReport, extract_to_folder, load_features  # noqa: E402
from .images import collect_images, image_to_tensor, load_image  # noqa: E402
from .in_memory import extract_features  # noqa: E402
from .pipeline import FeaturePipeline, build_pipeline  # noqa: E402
from .upsamplers import (  # noqa: E402
    LiFT,
    Upsampler,
    available_upsamplers,
    create_upsampler,
    register_upsampler,
)
from .variants import FeatureVariant, parse_variant, parse_variants  # noqa: E402

__all__ = [
    "FACETS",
    "BackboneError",
    "BackboneSpec",
    "CheckpointConfig",
    "CheckpointError",
    "CheckpointMismatchError",
    "ExtractionReport",
    "FeatliftError",
    "FeaturePipeline",
    "FeatureVariant",
    "ImageReadError",
    "InputSizeError",
    "LiFT",
    "Upsampler",
    "ViTBackbone",
    "available_upsamplers",
    "build_pipeline",
    "collect_images",
    "create_backbone",
    "create_upsampler",
    "extract_features",
    "extract_to_folder",
    "image_to_tensor",
    "import_original_lift",
    "load_checkpoint",
    "load_features",
    "load_image",
    "parse_variant",
    "parse_variants",
    "read_checkpoint_config",
    "register_upsampler",
    "save_checkpoint",
    "__version__",
]
