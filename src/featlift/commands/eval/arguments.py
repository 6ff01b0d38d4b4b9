"""What every ``featlift eval`` task shares on the command line: its arguments, and building and running it.

A task module does::

    def register(subparsers):
        parser = subparsers.add_parser("mytask", ...)
        add_eval_args(parser, default_size=(224, 224))
        parser.set_defaults(run=run)

    def run(args):
        config = MyTaskConfig(size=args.size, ...)
        results = run_task(args, evaluate_mytask, config)
        print(results.table())
        return 0
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch

from ...devices import resolve_device
from ...evaluate.report import TaskResults, VariantResult, write_results
from ...evaluate.runner import prepare_variants
from ...variants import FeatureVariant
from ..common import (
    add_backbone_args,
    add_device_arg,
    add_max_memory_arg,
    add_variant_arg,
    backbone_from_args,
    memory_defaults,
    size_arg,
    weights_from_args,
)


def add_eval_args(parser: argparse.ArgumentParser, default_size: tuple[int, int] | None = (224, 224)) -> None:
    """Add the arguments every eval task shares: backbone, ``--variant``, ``--size``, ``--device``, ``--out``."""
    add_backbone_args(parser)
    add_variant_arg(
        parser, "none, bilinear, input-2x, plus lift when featlift ships a checkpoint for the backbone"
    )
    size_help = "base input size S or HxW in pixels, a multiple of the patch size"
    if default_size is not None:
        size_help += f" (default {default_size[0]}x{default_size[1]})"
    parser.add_argument("--size", type=size_arg, default=default_size, help=size_help)
    add_device_arg(parser)
    add_max_memory_arg(parser)
    parser.add_argument("--out", default=None, help="write results.json and results.md into this folder")


def variants_from_args(args: argparse.Namespace, device: torch.device | str = "cpu") -> list[FeatureVariant]:
    """The backbone of the backbone args and the variants of ``--variant`` (or the defaults), on `device`."""
    return prepare_variants(args.variant, backbone_from_args(args), device, memory_defaults(args))


def run_task(
    args: argparse.Namespace,
    evaluate: Callable[..., TaskResults],
    config: Any,
    progress: Callable[[VariantResult], str] | None = None,
) -> TaskResults:
    """Run ``evaluate(config, variants, ...)`` on the variants and device of `args`; print ``progress(row)``
    for each variant as it is done; write results.json and results.md into ``--out`` when given."""
    device = resolve_device(args.device)
    config.check_data()  # a mistyped --data fails at once, not after the backbone is built (or downloaded)
    variants = variants_from_args(args, device)

    def report(row: VariantResult) -> None:
        if progress is not None:
            print(progress(row), flush=True)

    results = evaluate(config, variants, device=device, weights=weights_from_args(args), on_result=report)
    if args.out:
        write_results(args.out, results)
    return results


def announce_results(args: argparse.Namespace) -> None:
    """Say where the results went, when ``--out`` is given."""
    if args.out:
        print(f"results -> {args.out}/results.json, results.md")
