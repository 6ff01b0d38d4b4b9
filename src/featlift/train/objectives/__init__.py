"""Training objectives: the `Objective` base and its registry (`base`), the feature distances (`losses`),
and LiFT's objective (`lift`)."""

from .base import EpochEnd, Objective, available_objectives, get_objective, register_objective
from .lift import LiftObjective, lift_objective
from .losses import LOSSES, feature_loss

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
