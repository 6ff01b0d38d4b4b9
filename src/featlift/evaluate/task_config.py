"""The settings every evaluation task shares, and the checks of a task config's fields.

Each task has a config dataclass (``DavisConfig``, ``ProbeConfig``, ...) derived from `TaskConfig`; it
checks its fields when built and raises `FeatliftError` naming the field, the value and what was expected,
so that a library caller gets the same early refusal the command line gives.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import FeatliftError


@dataclass(kw_only=True)
class TaskConfig:
    """``size``: the base input size (H, W) in pixels, a multiple of the patch size; each variant loads its
    images at ``variant.input_size(size)``."""

    size: tuple[int, int] = (224, 224)

    def __post_init__(self) -> None:
        size = tuple(self.size) if isinstance(self.size, list | tuple) else ()
        if len(size) != 2 or not all(_is_int(v) and v >= 1 for v in size):
            self._refuse("size", self.size, "(height, width), two integers >= 1")
        self.size = (int(size[0]), int(size[1]))

    def check_data(self) -> None:
        """Refuse a ``data`` that names nothing on disk, before any model is built (the task's loader
        checks the dataset's layout in detail later)."""
        data = getattr(self, "data", None)
        if data is not None and not Path(data).exists():
            raise FeatliftError(f"{data}: no such file or folder (the dataset of {type(self).__name__}.data)")

    def _refuse(self, field: str, value: Any, expected: str) -> None:
        raise FeatliftError(f"{type(self).__name__}.{field} = {value!r}: expected {expected}")

    def check_int(self, field: str, minimum: int | None = None, optional: bool = False) -> None:
        """Field `field` is an integer, ``>= minimum`` when given (or None when `optional`)."""
        value = getattr(self, field)
        if optional and value is None:
            return
        if not _is_int(value) or (minimum is not None and value < minimum):
            expected = "an integer" + (f" >= {minimum}" if minimum is not None else "")
            self._refuse(field, value, expected + (" or None" if optional else ""))

    def check_float(
        self,
        field: str,
        low: float | None = None,
        high: float | None = None,
        *,
        low_open: bool = False,
        high_open: bool = False,
    ) -> None:
        """Field `field` is a finite number within ``[low, high]`` (either end may be open or absent)."""
        value = getattr(self, field)
        number = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        below = number and low is not None and (value <= low if low_open else value < low)
        above = number and high is not None and (value >= high if high_open else value > high)
        if not number or below or above:
            bounds = []
            if low is not None:
                bounds.append(f"{'>' if low_open else '>='} {low:g}")
            if high is not None:
                bounds.append(f"{'<' if high_open else '<='} {high:g}")
            self._refuse(field, value, " ".join(["a finite number", " and ".join(bounds)]).strip())

    def check_choice(self, field: str, choices: Collection[Any]) -> None:
        """Field `field` is one of `choices`."""
        value = getattr(self, field)
        if value not in choices:
            self._refuse(field, value, "one of " + ", ".join(str(c) for c in choices))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
