"""The ``featlift`` command: parses arguments and calls the library. ``main(argv) -> exit code``.

Exit codes: 0 success; 1 finished, but some inputs failed (reported); 2 bad usage or input; 3 internal
error (a bug: the traceback is printed); 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
import traceback

from . import __version__, commands
from .errors import FeatliftError
from .plugins import PLUGINS_ENV, load_plugins

EXIT_OK = 0
EXIT_SOME_INPUTS_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERNAL_ERROR = 3
EXIT_INTERRUPTED = 130


def add_plugin_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="MODULE|FILE.py",
        help=f"import a module that registers upsamplers or objectives (repeatable; also ${PLUGINS_ENV})",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="featlift", description="Denser dense features for pretrained vision backbones."
    )
    parser.add_argument("--version", action="version", version=f"featlift {__version__}")
    add_plugin_arg(parser)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="warnings and errors only, no progress bars"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        command = importlib.import_module(f"{commands.__name__}.{module.name}")
        if hasattr(command, "register"):
            command.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    # plugins first: the sub-commands' choices (e.g. --upsampler) include the methods they register
    early = argparse.ArgumentParser(add_help=False)
    add_plugin_arg(early)
    plugins = early.parse_known_args(argv)[0].plugin
    try:
        load_plugins(plugins)
    except FeatliftError as exc:
        print(f"featlift: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)
    try:
        return int(args.run(args) or EXIT_OK)
    except FeatliftError as exc:
        print(f"featlift {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"featlift {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug, not bad input: its own exit code, so scripts can tell the two apart
        traceback.print_exc(file=sys.stderr)
        print(
            f"featlift {args.command}: internal error ({type(exc).__name__}: {exc}); this is a bug in featlift, "
            f"please report it with the traceback above",
            file=sys.stderr,
        )
        return EXIT_INTERNAL_ERROR


if __name__ == "__main__":
    sys.exit(main())
