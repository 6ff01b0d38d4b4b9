"""Self-supervised training of upsamplers (LiFT) on any folder of images: loop, cache, DDP."""

from .cache import FeatureCache, cache_key
from .data import TrainImage, check_image_size, scan_images, split_images
from .loop import TrainConfig, TrainResult, train
from .objectives import LOSSES, feature_loss, lift_objective

__all__ = [
    "LOSSES",
    "FeatureCache",
    "TrainConfig",
    "TrainImage",
    "TrainResult",
    "cache_key",
    "check_image_size",
    "feature_loss",
    "lift_objective",
    "scan_images",
    "split_images",
    "train",
]
