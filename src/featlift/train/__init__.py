"""Self-supervised training of upsamplers on any folder of images: loop, plug-in objectives, views, cache, DDP."""

from .batches import Batch
from .cache import FeatureCache, cache_key
from .config import TrainConfig
from .data import TrainImage, scan_images, split_images
from .loop import TrainResult, train
from .objectives import (
    LOSSES,
    EpochEnd,
    Objective,
    available_objectives,
    feature_loss,
    get_objective,
    lift_objective,
    register_objective,
)
from .views import View

__all__ = [
    "LOSSES",
    "Batch",
    "EpochEnd",
    "FeatureCache",
    "Objective",
    "TrainConfig",
    "TrainImage",
    "TrainResult",
    "View",
    "available_objectives",
    "cache_key",
    "feature_loss",
    "get_objective",
    "lift_objective",
    "register_objective",
    "scan_images",
    "split_images",
    "train",
]
