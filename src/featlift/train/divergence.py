"""Stopping a diverged run before it saves anything: non-finite losses or weights, or an unloadable model.

A run stops at the first optimizer step whose loss or updated weights are not finite, and before
saving any epoch whose model or metrics are not finite or whose config the upsampler itself rejects
(e.g. a fitted LiFT ``output_scale`` of 0 from outputs too large for the scale fit). The checkpoint and
training state of the last good epoch stay on disk untouched. Every DDP rank takes the same decision:
the loss is all-reduced and the weights are identical on all ranks.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..checkpoint import check_buildable
from ..errors import CheckpointError, FeatliftError
from ..upsamplers import Upsampler
from ..weightfiles import non_finite_tensors


class TrainingDivergedError(FeatliftError):
    """Training gave a non-finite loss, non-finite weights or a model that featlift cannot load."""


def _non_finite_numbers(values: dict[str, Any]) -> list[str]:
    return [f"{k} {v}" for k, v in values.items() if isinstance(v, float) and not math.isfinite(v)]


class DivergenceGuard:
    """Checks each step and each epoch before it is saved; raises `TrainingDivergedError` naming where."""

    def __init__(self, run_dir: Path, lr: float, epochs_done: int):
        self.run_dir = run_dir
        self.lr = lr
        self.last_saved_epoch = epochs_done  # epochs whose checkpoint and state are on disk

    def after_step(self, loss: float, upsampler: Upsampler, epoch: int, step: int) -> None:
        where = f"step {step + 1}"
        if not math.isfinite(loss):
            self._stop(epoch, where, f"the loss is {loss}")
        bad = non_finite_tensors(upsampler.state_dict())
        if bad:
            self._stop(epoch, where, f"the weights {bad[0]} are not finite after the optimizer step")

    def before_save(self, upsampler: Upsampler, epoch: int, record: dict[str, Any]) -> None:
        """Raise instead of letting epoch `epoch` save a model or metrics that are not usable."""
        where = "before saving it"
        bad = non_finite_tensors(upsampler.state_dict())
        if bad:
            self._stop(epoch, where, f"the weights {bad[0]} are not finite")
        bad = _non_finite_numbers(record) + _non_finite_numbers(upsampler.config())
        if bad:
            self._stop(epoch, where, f"not finite: {', '.join(bad)}")
        try:  # the check `load_checkpoint` will do: rebuild the upsampler from its config
            check_buildable(upsampler.name, upsampler.config(), "its config")
        except CheckpointError as exc:
            self._stop(epoch, where, f"its model could not be loaded again ({exc})")
        self.last_saved_epoch = epoch + 1

    def _stop(self, epoch: int, where: str, what: str) -> None:
        if self.last_saved_epoch:
            kept = (
                f"nothing of epoch {epoch + 1} was saved; the checkpoint and training state of epoch "
                f"{self.last_saved_epoch} in {self.run_dir} are kept"
            )
        else:
            kept = "nothing was saved (no epoch was completed)"
        raise TrainingDivergedError(
            f"training diverged in epoch {epoch + 1}, {where}: {what}; {kept}. --lr {self.lr:g} is probably "
            f"too high: train again with a lower one (e.g. --lr {self.lr / 10:g}) and --overwrite, or with "
            "another --out"
        )
