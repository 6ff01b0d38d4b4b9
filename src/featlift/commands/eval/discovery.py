"""``featlift eval discovery``: the command line of `featlift.evaluate.discovery`."""

from __future__ import annotations

import argparse

from ...evaluate.discovery import (
    DEFAULT_EPS,
    DEFAULT_TAU,
    FORMATS,
    MAX_NODES,
    DiscoveryConfig,
    evaluate_discovery,
)
from ..common import positive_int
from ..numbers import float_in
from .arguments import add_eval_args, run_task


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "discovery",
        help="unsupervised object discovery with TokenCut (CorLoc on VOC07/VOC12/COCO20k)",
        description="TokenCut's normalised cut on each variant's feature graph; CorLoc = share of images whose "
        "box has IoU >= 0.5 with a ground-truth box. Images are resized to the variant's input size "
        "(aspect ratio ignored) and boxes scaled back to original pixels. TokenCut itself uses the key facet "
        "of the last block (--facet key).",
    )
    parser.add_argument("--data", required=True, metavar="ROOT", help="dataset root (see --format)")
    parser.add_argument("--format", choices=FORMATS, required=True, help="dataset layout")
    parser.add_argument(
        "--split", default="trainval", help="VOC image set in ImageSets/Main (default trainval)"
    )
    parser.add_argument(
        "--annotations", default=None, help="coco20k: COCO instances JSON (default under ROOT/annotations)"
    )
    parser.add_argument(
        "--limit", type=positive_int, default=None, metavar="N", help="only the first N images"
    )
    parser.add_argument(
        "--tau",
        type=float_in(-1, 1, high_open=True),
        default=DEFAULT_TAU,
        help=f"cosine threshold of an edge, in [-1, 1) (default {DEFAULT_TAU})",
    )
    parser.add_argument(
        "--eps",
        type=float_in(0, 1, low_open=True, high_open=True),
        default=DEFAULT_EPS,
        help=f"weight of non-edges, in (0, 1) (default {DEFAULT_EPS:g})",
    )
    parser.add_argument(
        "--max-nodes",
        type=positive_int,
        default=MAX_NODES,
        help=f"refuse feature grids with more cells (default {MAX_NODES})",
    )
    add_eval_args(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    config = DiscoveryConfig(
        size=args.size,
        data=args.data,
        format=args.format,
        split=args.split,
        annotations=args.annotations,
        limit=args.limit,
        tau=args.tau,
        eps=args.eps,
        max_nodes=args.max_nodes,
    )
    print(run_task(args, evaluate_discovery, config).table())
    return 0
