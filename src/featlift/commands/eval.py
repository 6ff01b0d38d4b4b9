"""``featlift eval <task>``: every module in `featlift.evaluate` with a ``register`` adds a task."""

from __future__ import annotations

import importlib
import pkgutil

from .. import evaluate


def register(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="evaluate feature variants on dense tasks")
    tasks = parser.add_subparsers(dest="task", metavar="TASK", required=True)
    for module in sorted(pkgutil.iter_modules(evaluate.__path__), key=lambda m: m.name):
        task = importlib.import_module(f"{evaluate.__name__}.{module.name}")
        if hasattr(task, "register"):
            task.register(tasks)
