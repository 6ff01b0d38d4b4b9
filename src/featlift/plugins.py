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
            return import_file(resolved, f"featlift_plugin_{resolved.stem}_{digest}")
        return importlib.import_module(spec)
    except FeatliftError:
        raise
    except Exception as exc:
        raise FeatliftError(f"plugin {spec}: importing it failed ({type(exc).__name__}: {exc})") from exc


def import_file(path: str | Path, name: str) -> ModuleType:
    """Import the Python file `path` as module `name` (``__main__`` becomes ``__mp_main__``, as in
    multiprocessing, so a script's main block does not run), its folder first on ``sys.path`` for its own
    imports. Errors propagate; a module that fails to import is not left in ``sys.modules``."""
    folder = str(Path(path).parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    name = "__mp_main__" if name == "__main__" else name
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise FeatliftError(f"{path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


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
