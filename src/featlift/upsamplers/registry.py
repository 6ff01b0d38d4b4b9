"""Name -> upsampler class. A new method is one file in this package that decorates its class."""

from __future__ import annotations

from ..registry import Registry
from .base import Upsampler

UPSAMPLERS: Registry[type[Upsampler]] = Registry("upsampler", Upsampler)


def register_upsampler(name: str):
    """Class decorator: make ``create_upsampler(name, ...)`` build this `Upsampler` subclass."""
    return UPSAMPLERS.register(name)


def available_upsamplers() -> list[str]:
    return UPSAMPLERS.names()


def get_upsampler_class(name: str) -> type[Upsampler]:
    return UPSAMPLERS.get(name)


def create_upsampler(name: str, **args) -> Upsampler:
    """Build a registered upsampler, e.g. ``create_upsampler("lift", channels=384, patch_size=14)``."""
    return get_upsampler_class(name)(**args)
