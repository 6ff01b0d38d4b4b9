"""``featlift eval probe``: the command line of `featlift.evaluate.probe`."""

from __future__ import annotations

import argparse

from ...evaluate.probe import DEFAULT_CACHE_MIB, FORMATS, PROTOCOLS, ProbeConfig, evaluate_probe
from ..numbers import float_in, int_at_least
from .arguments import add_eval_args, announce_results, run_task


def _protocol_help() -> str:
    lines = []
    for name, p in PROTOCOLS.items():
        labels = f"labels {p.label_size}²" if p.label_size else "labels at their own size"
        lines.append(
            f"{name}: {p.input_size} px ({p.resize}), features {p.feature_size}, {labels}, AdamW lr {p.lr} "
            f"wd {p.weight_decay}, {p.epochs} epochs, batch {p.batch_size}, cosine {p.schedule}"
            + (", flip" if p.flip else "")
            + (", standardised" if p.standardise else "")
        )
    return "; ".join(lines)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "probe",
        help="linear-probe semantic segmentation on frozen features (CamVid, VOC, ADE20K, Cityscapes, COCO-Stuff; mIoU)",
        description="Train a linear layer on each variant's frozen features of the train split and report val mIoU "
        "under a named protocol; the protocol and every setting are written into results.json.",
    )
    parser.add_argument("--data", required=True, help="dataset root")
    parser.add_argument("--format", choices=sorted(FORMATS), required=True, help="dataset layout")
    parser.add_argument(
        "--protocol",
        choices=list(PROTOCOLS),
        default="featlift",
        help="the recipe (featlift): " + _protocol_help(),
    )
    parser.add_argument(
        "--limit-train", type=int_at_least(1), default=None, help="use only the first N train images"
    )
    parser.add_argument(
        "--limit-val", type=int_at_least(1), default=None, help="use only the first N val images"
    )
    parser.add_argument("--epochs", type=int_at_least(1), default=None, help="override the protocol's epochs")
    parser.add_argument(
        "--lr",
        type=float_in(0, low_open=True),
        default=None,
        help="override the protocol's AdamW learning rate",
    )
    parser.add_argument(
        "--weight-decay", type=float_in(0), default=None, help="override the protocol's weight decay"
    )
    parser.add_argument(
        "--batch-size",
        type=int_at_least(1),
        default=None,
        help="override the protocol's images per training step",
    )
    parser.add_argument("--seed", type=int, default=None, help="override the protocol's seed (0)")
    parser.add_argument(
        "--train-label-side",
        type=int_at_least(1),
        default=None,
        help="shrink training labels (nearest-exact) to at most this long side (featlift protocol: 160)",
    )
    parser.add_argument(
        "--feature-batch", type=int_at_least(1), default=8, help="images per feature computation (8)"
    )
    parser.add_argument(
        "--cache-mib",
        type=float_in(0),
        default=DEFAULT_CACHE_MIB,
        help=f"cache training features up to this many MiB, else recompute them every epoch ({DEFAULT_CACHE_MIB})",
    )
    add_eval_args(parser, default_size=(224, 224))
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    config = ProbeConfig(
        size=args.size,
        data=args.data,
        format=args.format,
        protocol=args.protocol,
        limit_train=args.limit_train,
        limit_val=args.limit_val,
        epochs=args.epochs,
        lr=args.lr,
        weight_decay=args.weight_decay,
        batch_size=args.batch_size,
        seed=args.seed,
        train_label_side=args.train_label_side,
        feature_batch=args.feature_batch,
        cache_mib=args.cache_mib,
    )
    results = run_task(
        args,
        evaluate_probe,
        config,
        lambda row: (
            f"{row.variant} [protocol {row.details.get('protocol')}]: mIoU {row.metrics['mIoU']:.1f} "
            f"pixel acc {row.metrics['pixel acc']:.1f} ({row.ms_per_image:.0f} ms/image features)"
        ),
    )
    announce_results(args)
    print(results.table())
    return 0
