"""``featlift import-lift PTH``: convert an original LiFT .pth into a featlift checkpoint."""

from __future__ import annotations

import argparse

from ..lift_import import import_original_lift
from .common import add_backbone_args, backbone_from_args


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "import-lift",
        help="convert a checkpoint of the original LiFT code into featlift's format",
        description="The original .pth files record nothing about their backbone: state the backbone, layer and "
        "facet they were trained for (the original code's default is the key facet of the last block).",
    )
    parser.add_argument("pth", help="original LiFT state dict (.pth), `module.` prefixes allowed")
    add_backbone_args(parser)
    parser.add_argument("--out", required=True, help="checkpoint folder to write")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    backbone = backbone_from_args(args)
    _, config = import_original_lift(args.pth, backbone, args.out)
    print(f"featlift import-lift: wrote {args.out} ({config.backbone.describe()})")
    return 0
