"""``featlift eval warp``: the command line of `featlift.evaluate.warp`."""

from __future__ import annotations

import argparse

from ...evaluate.warp import WarpConfig, evaluate_warp
from ..numbers import float_in, int_at_least
from .arguments import add_eval_args, announce_results, run_task


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "warp",
        help="keypoint correspondence under known random homographies and on a real stereo pair (PCK)",
        description="Match a grid of keypoints between each image and a seeded random homography of it (and, with "
        "--stereo, across skimage's Middlebury stereo pair) by nearest neighbours of the features; report PCK@0.1, "
        "0.05, 0.01 of max(h, w). `--data stereo` runs the stereo pair only.",
    )
    parser.add_argument(
        "--data", required=True, help="image folder/glob/file(s), or 'stereo' for the stereo pair only"
    )
    parser.add_argument(
        "--stereo", action="store_true", help="also match across skimage.data.stereo_motorcycle()"
    )
    parser.add_argument(
        "--limit", type=int_at_least(1), default=None, help="use only the first N images (sorted by path)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random homographies (0)")
    parser.add_argument(
        "--strength",
        type=float_in(0, 0.5, high_open=True),
        default=0.15,
        help="max corner shift, a fraction of the size, in [0, 0.5) (0.15)",
    )
    parser.add_argument(
        "--keypoints", type=int_at_least(1), default=20, help="a KxK grid of source keypoints (20)"
    )
    add_eval_args(parser, default_size=(224, 224))
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    config = WarpConfig(
        size=args.size,
        data=args.data,
        stereo=args.stereo,
        limit=args.limit,
        seed=args.seed,
        strength=args.strength,
        keypoints=args.keypoints,
    )
    results = run_task(
        args,
        evaluate_warp,
        config,
        lambda row: (
            f"{row.variant}: "
            + " ".join(f"{k} {v:.1f}" for k, v in row.metrics.items())
            + f" ({row.ms_per_image:.0f} ms/image features)"
        ),
    )
    announce_results(args)
    print(results.table())
    return 0
