"""Upsamplers and training objectives defined outside featlift: imported so that their decorators register them.

A plugin is a Python module (``my_package.my_upsampler``) or a ``.py`` file that registers classes with
``@register_upsampler`` / ``@register_objective`` when imported. The ``featlift`` command imports the
plugins named by ``--plugin`` (repeatable), by ``$FEATLIFT_PLUGINS`` (separated by ``os.pathsep``) and by
installed packages' ``featlift.plugins`` entry points; in Python, importing the module is enough.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

from .errors import FeatliftError

PLUGINS_ENV = "FEATLIFT_PLUGINS"
ENTRY_POINT_GROUP = "featlift.plugins"


def load_plugin(spec: str) -> ModuleType:
    """Import the module named `spec`, or the Python file at path `spec`; `FeatliftError` if it fails."""
    path = Path(spec)
    try:
        if spec.endswith(".py") or path.is_file():
            if not path.is_file():
                raise FeatliftError(f"plugin {spec}: no such file")
            resolved = path.resolve()
            for module in list(sys.modules.values()):  # already imported (e.g. by the caller): not twice
                if getattr(module, "__file__", None) and Path(module.__file__).resolve() == resolved:
                    return module
            digest = hashlib.sha256(str(resolved).encode()).hexdigest()[:12]
            name = f"featlift_plugin_{resolved.stem}_{digest}"
            loader_spec = importlib.util.spec_from_file_location(name, resolved)
            if loader_spec is None or loader_spec.loader is None:
                raise FeatliftError(f"plugin {spec}: not a Python file")
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[name] = module
            try:
                loader_spec.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(name, None)
                raise
            return module
        return importlib.import_module(spec)
    except FeatliftError:
        raise
    except Exception as exc:
        raise FeatliftError(f"plugin {spec}: importing it failed ({type(exc).__name__}: {exc})") from exc


def load_plugins(specs: list[str] | None = None) -> list[ModuleType]:
    """Import `specs`, then the plugins of ``$FEATLIFT_PLUGINS`` and of the ``featlift.plugins`` entry points."""
    wanted = list(specs or [])
    wanted += [s for s in os.environ.get(PLUGINS_ENV, "").split(os.pathsep) if s.strip()]
    modules = [load_plugin(spec.strip()) for spec in wanted]
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            modules.append(entry.load())
        except Exception as exc:
            raise FeatliftError(
                f"plugin {entry.name} (entry point {entry.value} of group {ENTRY_POINT_GROUP}): "
                f"importing it failed ({type(exc).__name__}: {exc})"
            ) from exc
    return modules
