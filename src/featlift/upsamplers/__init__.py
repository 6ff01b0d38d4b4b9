"""Feature upsamplers behind one contract, ``forward(features, guide, output_size)`` (see `base`).

Every module in this package is imported here, so a new method is added by one file that
decorates its class with ``@register_upsampler("name")``.
"""

import importlib
import pkgutil

from .base import Capabilities, Upsampler
from .registry import available_upsamplers, create_upsampler, get_upsampler_class, register_upsampler

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from .bilinear import Bilinear  # noqa: E402
from .lift import LiFT  # noqa: E402

__all__ = [
    "Bilinear",
    "Capabilities",
    "LiFT",
    "Upsampler",
    "available_upsamplers",
    "create_upsampler",
    "get_upsampler_class",
    "register_upsampler",
]
