"""Training objectives as plug-ins: what `featlift train` optimises, which views it needs, what it reports.

An objective is a subclass of `Objective` registered with ``@register_objective("name")``; `featlift train`
uses it with ``--objective name`` or, by default, the objective the upsampler class declares
(``capabilities.objective``). It may live in any module (a user's, a test file) that is imported before
training starts. A minimal one declares its views and computes the loss from a `Batch`::

    from featlift.train.objectives import Objective, register_objective
    from featlift.train.views import View

    @register_objective("half-to-full")
    class HalfToFull(Objective):
        views = (View("full", 1.0), View("half", 0.5))

        def loss(self, upsampler, batch):
            full = batch.features["full"]
            pred = upsampler(batch.features["half"], batch.guide("half"), tuple(full.shape[-2:]))
            return self.feature_loss(pred, full)  # the distance of --loss

The training loop loads the declared views of every image (pixels and frozen-backbone features, cached
under the view names), hands the objective one `Batch` per step and backpropagates `loss` (called inside
the DDP-wrapped module, so DDP sees one forward per step). Optionally an objective also

- validates: ``sums`` names what `validation_sums` returns per batch (sums over its images), and
  `validation_metrics` turns their totals over the held-out images (all DDP ranks) into the metrics of
  the epoch's log record;
- runs `after_epoch` (e.g. fits an upsampler argument; what it returns joins the epoch's record). An
  argument it fits is named in ``fitted_args``: it is no setting a ``--resume`` must match, and on resume it
  is set back from the last epoch record that has a value under its name;
- has trainable parameters of its own (FeatUp's attention downsampler): `prepare` builds them once the upsampler
  exists, `modules` names them; the loop moves them to the device, optimises them with the upsampler (one
  Adam), puts them in train/eval mode with it, wraps them in DDP with it and saves them in the resumable
  training state (``--resume`` restores them); they are not saved with the upsampler's checkpoint;
- runs `after_step` after every optimiser step (e.g. an EMA teacher follows the upsampler); state it keeps
  belongs in its `modules` (buffers included), so that ``--resume`` restores it;
- draws random numbers in `loss` (dropout, random projections, a choice of views): ``stochastic = True`` makes
  the loop seed torch's generator from (seed, epoch, step, rank) before every step, so a resumed run repeats
  the uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from ...errors import FeatliftError
from ...registry import Registry
from ...upsamplers import Upsampler
from ..batches import Batch
from ..data import TrainImage
from ..views import View, check_views
from .losses import LOSSES, feature_loss

T = TypeVar("T", bound="type[Objective]")


@dataclass(frozen=True)
class EpochEnd:
    """What `Objective.after_epoch` gets besides the upsampler.

    ``evaluate(images)``: the totals of the objective's validation sums over `images` (all DDP ranks) and the
    number of images that could be read, computed as validation computes them.
    """

    epoch: int
    train_images: list[TrainImage]
    evaluate: Callable[[list[TrainImage]], tuple[dict[str, float], int]]


class Objective:
    """A training objective; see the module docstring. ``loss`` is the ``--loss`` distance (`LOSSES`)."""

    name: ClassVar[str] = ""
    views: ClassVar[tuple[View, ...]] = ()
    sums: ClassVar[tuple[str, ...]] = ()
    fitted_args: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str] = ""  # recorded in the checkpoint's training summary
    stochastic: ClassVar[bool] = False  # the loss draws random numbers: seeded per step by the loop

    own_loss: ClassVar[str] = ""  # the original's loss it always trains with ("": the --loss distance)

    def __init__(self, loss: str = "cosine"):
        if loss not in LOSSES:
            raise FeatliftError(f"--loss {loss}: expected one of {', '.join(LOSSES)}")
        if self.own_loss and loss != "cosine":
            raise FeatliftError(
                f"--loss {loss}: objective {self.name} trains with its original's own loss ({self.own_loss}); "
                "--loss does not apply to it"
            )
        self.distance = loss

    def feature_loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return feature_loss(pred, target, self.distance)

    def prepare(self, upsampler: Upsampler, channels: int) -> None:
        """Build the objective's own trainable modules for `upsampler` on `channels`-channel features (called once
        by the loop, after the upsampler is built and before the optimizer; default: none)."""

    def modules(self) -> dict[str, nn.Module]:
        """The objective's own trainable modules by name (built by `prepare`); default none."""
        return {}

    def loss(self, upsampler: Upsampler, batch: Batch) -> torch.Tensor:
        """The scalar loss of one training step."""
        raise NotImplementedError

    def after_step(self, upsampler: Upsampler) -> None:
        """Runs after every optimiser step, with the (unwrapped) upsampler just updated (default: nothing)."""

    def validation_sums(self, upsampler: Upsampler, batch: Batch) -> torch.Tensor:
        """Float64 ``[len(sums)]``: each of ``sums`` summed over the batch's images (called under no_grad)."""
        raise NotImplementedError

    def validation_metrics(self, sums: dict[str, float], images: int) -> dict[str, Any]:
        """The epoch's metrics from the totals of ``sums`` over `images` (> 0) held-out images."""
        return {}

    def after_epoch(self, upsampler: Upsampler, end: EpochEnd) -> dict[str, Any]:
        """Runs after every epoch's validation, before the checkpoint is saved; returns entries for the log."""
        return {}


def _check_objective(cls: type[Objective], name: str) -> None:
    check_views(cls.views, f"objective {name!r}")


OBJECTIVES: Registry[type[Objective]] = Registry("training objective", Objective, _check_objective)


def register_objective(name: str) -> Callable[[T], T]:
    """Class decorator: make ``--objective name`` use this `Objective` subclass."""
    return OBJECTIVES.register(name)


def available_objectives() -> list[str]:
    return OBJECTIVES.names()


def get_objective(name: str) -> type[Objective]:
    return OBJECTIVES.get(name)
