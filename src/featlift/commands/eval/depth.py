"""``featlift eval depth``: the command line of `featlift.evaluate.depth`."""

from __future__ import annotations

import argparse

from ...evaluate.depth import CROPS, LAYOUTS, DepthConfig, DepthRecipe, evaluate_depth
from ..numbers import float_in, int_at_least
from .arguments import add_eval_args, announce_results, run_task


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "depth",
        help="linear monocular-depth probe on frozen features (NYUv2 layouts; RMSE, delta1, abs rel)",
        description="Train Probe3D's linear bin-depth probe on each variant's frozen features of the train split "
        "and report RMSE, delta1 < 1.25 and abs rel on the test split. The recipe is fixed and written into "
        "results.json.",
    )
    parser.add_argument("--data", required=True, help="dataset root")
    parser.add_argument(
        "--format",
        choices=sorted(LAYOUTS),
        default="nyu",
        help="dataset layout: nyu = images/{train,test}/ + depth/{train,test}/ (.png uint16 or .npy metres); "
        "nyu-official-splits = BTS's official_splits/{train,test}/<scene>/rgb_N.jpg + sync_depth_N.png (nyu)",
    )
    parser.add_argument(
        "--crop",
        choices=CROPS,
        default="center",
        help="center: the central square of image and depth (Probe3D)",
    )
    parser.add_argument(
        "--png-units-per-metre",
        type=float_in(0, low_open=True),
        default=1000.0,
        help="units per metre of 16-bit depth PNGs (1000: millimetres)",
    )
    parser.add_argument(
        "--limit-train", type=int_at_least(1), default=None, help="only the first N train images"
    )
    parser.add_argument(
        "--limit-test", type=int_at_least(1), default=None, help="only the first N test images"
    )
    parser.add_argument(
        "--epochs",
        type=int_at_least(1),
        default=DepthRecipe.epochs,
        help=f"training epochs ({DepthRecipe.epochs})",
    )
    parser.add_argument(
        "--lr",
        type=float_in(0, low_open=True),
        default=DepthRecipe.lr,
        help=f"AdamW learning rate ({DepthRecipe.lr})",
    )
    parser.add_argument("--weight-decay", type=float_in(0), default=DepthRecipe.weight_decay)
    parser.add_argument(
        "--warmup-epochs",
        type=float_in(0),
        default=DepthRecipe.warmup_epochs,
        help=f"linear lr warm-up, in epochs ({DepthRecipe.warmup_epochs})",
    )
    parser.add_argument(
        "--batch-size", type=int_at_least(1), default=DepthRecipe.batch_size, help="images per batch (8)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--train-label-side",
        type=int_at_least(1),
        default=DepthRecipe.train_label_side,
        help=f"resize training depth maps (nearest) to at most this long side ({DepthRecipe.train_label_side})",
    )
    parser.add_argument(
        "--max-depth",
        type=float_in(0, low_open=True),
        default=DepthRecipe.max_depth,
        help=f"depths above this (m) are invalid; also the largest bin centre ({DepthRecipe.max_depth:g})",
    )
    parser.add_argument(
        "--cache-mib",
        type=float_in(0),
        default=2048.0,
        help="hold the train features in memory up to this size, else recompute them each epoch (2048)",
    )
    add_eval_args(parser, default_size=(224, 224))
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    config = DepthConfig(
        size=args.size,
        data=args.data,
        format=args.format,
        crop=args.crop,
        png_units_per_metre=args.png_units_per_metre,
        limit_train=args.limit_train,
        limit_test=args.limit_test,
        cache_mib=args.cache_mib,
        epochs=args.epochs,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        train_label_side=args.train_label_side,
        max_depth=args.max_depth,
    )
    results = run_task(
        args,
        evaluate_depth,
        config,
        lambda row: (
            f"{row.variant}: RMSE {row.metrics['RMSE']:.3f} delta1 {row.metrics['delta1']:.3f} "
            f"abs rel {row.metrics['abs rel']:.3f} ({row.ms_per_image:.0f} ms/image features)"
        ),
    )
    announce_results(args)
    print(results.table())
    if results.extra_markdown:
        print(results.extra_markdown)
    return 0
