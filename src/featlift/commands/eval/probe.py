"""``featlift eval probe``: the command line of `featlift.evaluate.probe`."""

from __future__ import annotations

import argparse

from ...evaluate.probe import FORMATS, ProbeConfig, ProbeRecipe, evaluate_probe
from ..numbers import float_in, int_at_least
from .arguments import add_eval_args, announce_results, run_task


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "probe",
        help="linear-probe semantic segmentation on frozen features (CamVid, VOC, ADE20K; mIoU)",
        description="Train a linear layer on each variant's frozen features of the train split and report val mIoU. "
        "The recipe is fixed and written into results.json.",
    )
    parser.add_argument("--data", required=True, help="dataset root")
    parser.add_argument("--format", choices=sorted(FORMATS), required=True, help="dataset layout")
    parser.add_argument(
        "--limit-train", type=int_at_least(1), default=None, help="use only the first N train images"
    )
    parser.add_argument(
        "--limit-val", type=int_at_least(1), default=None, help="use only the first N val images"
    )
    parser.add_argument(
        "--epochs",
        type=int_at_least(1),
        default=ProbeRecipe.epochs,
        help=f"training epochs ({ProbeRecipe.epochs})",
    )
    parser.add_argument(
        "--lr",
        type=float_in(0, low_open=True),
        default=ProbeRecipe.lr,
        help=f"AdamW learning rate ({ProbeRecipe.lr})",
    )
    parser.add_argument("--weight-decay", type=float_in(0), default=ProbeRecipe.weight_decay)
    parser.add_argument(
        "--batch-size", type=int_at_least(1), default=8, help="images per feature and training batch (8)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--train-label-side",
        type=int_at_least(1),
        default=ProbeRecipe.train_label_side,
        help=f"resize training labels (nearest) to at most this long side, for speed ({ProbeRecipe.train_label_side})",
    )
    add_eval_args(parser, default_size=(224, 224))
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    config = ProbeConfig(
        size=args.size,
        data=args.data,
        format=args.format,
        limit_train=args.limit_train,
        limit_val=args.limit_val,
        epochs=args.epochs,
        lr=args.lr,
        weight_decay=args.weight_decay,
        batch_size=args.batch_size,
        seed=args.seed,
        train_label_side=args.train_label_side,
    )
    results = run_task(
        args,
        evaluate_probe,
        config,
        lambda row: (
            f"{row.variant}: mIoU {row.metrics['mIoU']:.1f} pixel acc {row.metrics['pixel acc']:.1f} "
            f"({row.ms_per_image:.0f} ms/image features)"
        ),
    )
    announce_results(args)
    print(results.table())
    return 0
