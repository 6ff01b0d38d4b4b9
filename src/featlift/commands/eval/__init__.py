"""``featlift eval <task>``: every module of this package with a ``register`` adds a task.

Every task takes ``--out``; it is checked (created, and a file written there) before the task starts, so
that an evaluation never runs to the end only to fail on its output folder.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
from collections.abc import Callable

from ...fileio import check_writable_dir


def register(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="evaluate feature variants on dense tasks")
    tasks = parser.add_subparsers(dest="task", metavar="TASK", required=True)
    for module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        task = importlib.import_module(f"{__name__}.{module.name}")
        if hasattr(task, "register"):
            task.register(tasks)
    for task_parser in tasks.choices.values():
        task_parser.set_defaults(run=_output_checked_first(task_parser.get_default("run")))


def _output_checked_first(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def checked(args: argparse.Namespace) -> int:
        if args.out is not None:
            check_writable_dir(args.out, "--out")
        return run(args)

    return checked
