"""Name -> upsampler class. A new method is one file in this package that decorates its class."""

from __future__ import annotations

from typing import TypeVar

from ..errors import FeatliftError

_UPSAMPLERS: dict[str, type] = {}

T = TypeVar("T", bound=type)


def register_upsampler(name: str):
    """Class decorator: make ``create_upsampler(name, ...)`` build this class."""

    def decorate(cls: T) -> T:
        if name in _UPSAMPLERS and _UPSAMPLERS[name] is not cls:
            raise FeatliftError(
                f"upsampler {name!r} is already registered by {_UPSAMPLERS[name].__qualname__}"
            )
        cls.name = name
        _UPSAMPLERS[name] = cls
        return cls

    return decorate


def available_upsamplers() -> list[str]:
    return sorted(_UPSAMPLERS)


def get_upsampler_class(name: str) -> type:
    try:
        return _UPSAMPLERS[name]
    except KeyError:
        raise FeatliftError(
            f"unknown upsampler {name!r}; available: {', '.join(available_upsamplers())}"
        ) from None


def create_upsampler(name: str, **args):
    """Build a registered upsampler, e.g. ``create_upsampler("lift", channels=384, patch_size=14)``."""
    return get_upsampler_class(name)(**args)
