"""Training objectives: the `Objective` base and its registry (`base`), the feature distances (`losses`), and
one file per objective (`lift`, ...). Every module here is imported, so a new objective is one file that
decorates its class with ``@register_objective("name")``."""

import importlib
import pkgutil

from .base import EpochEnd, Objective, available_objectives, get_objective, register_objective
from .losses import LOSSES, feature_loss

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from .lift import LiftObjective, lift_objective  # noqa: E402

__all__ = [
    "LOSSES",
    "EpochEnd",
    "LiftObjective",
    "Objective",
    "available_objectives",
    "feature_loss",
    "get_objective",
    "lift_objective",
    "register_objective",
]
