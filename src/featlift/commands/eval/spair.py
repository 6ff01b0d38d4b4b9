"""``featlift eval spair``: the command line of `featlift.evaluate.spair`."""

from __future__ import annotations

import argparse

from ...evaluate.spair import SPLITS, SpairConfig, evaluate_spair
from ..common import positive_int
from .arguments import add_eval_args, run_task


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "spair",
        help="keypoint correspondence on SPair-71k (PCK@0.1/0.05/0.01 of the target box)",
        description="Transfer each source keypoint to the target image by cosine nearest neighbour of the "
        "features and report PCK (threshold alpha * max side of the target box, in original pixels), "
        "per category and averaged over categories, for every --variant. Images are resized to the "
        "variant's input size, ignoring aspect ratio.",
    )
    parser.add_argument(
        "--data", required=True, metavar="ROOT", help="SPair-71k root (JPEGImages/, PairAnnotation/)"
    )
    parser.add_argument("--split", choices=SPLITS, default="test", help="pair split (default test)")
    parser.add_argument(
        "--pairs-per-category",
        type=positive_int,
        default=None,
        metavar="N",
        help="a seeded sample of N pairs per category (default all)",
    )
    parser.add_argument("--categories", default=None, help="comma-separated categories (default all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the pair sample (default 0)")
    add_eval_args(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    config = SpairConfig(
        size=args.size,
        data=args.data,
        split=args.split,
        pairs_per_category=args.pairs_per_category,
        categories=[c for c in args.categories.split(",") if c] if args.categories else None,
        seed=args.seed,
    )
    print(run_task(args, evaluate_spair, config).table())
    return 0
