"""``featlift eval davis``: the command line of `featlift.evaluate.davis`."""

from __future__ import annotations

import argparse
from pathlib import Path

from ...evaluate.davis import LAYOUT, DavisConfig, evaluate_davis
from ..numbers import float_in, int_at_least
from .arguments import add_eval_args, announce_results, run_task


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "davis",
        help="semi-supervised video object segmentation by label propagation (DAVIS 2016/2017, J&F)",
        description="Propagate the first frame's masks through each video with every feature variant "
        "(DINO/LiFT protocol) and report J, F and J&F (x100), per variant and per sequence. "
        + f"Layout: {LAYOUT}.",
    )
    parser.add_argument("--data", required=True, help="DAVIS root folder")
    parser.add_argument(
        "--year", type=int, choices=(2016, 2017), default=2016, help="2016: one object; 2017: several"
    )
    parser.add_argument(
        "--sequences", default=None, help="comma-separated sequence names (default: val.txt or all)"
    )
    parser.add_argument(
        "--resolution", default="480p", help="image/annotation subfolder: 480p (default) or Full-Resolution"
    )
    parser.add_argument(
        "--max-frames",
        type=int_at_least(2),
        default=None,
        help="use only the first N >= 2 frames of each sequence (the first frame is the given one)",
    )
    parser.add_argument(
        "--n-last",
        type=int_at_least(0),
        default=7,
        help="previous frames in the context, besides the first (7)",
    )
    parser.add_argument(
        "--topk", type=int_at_least(1), default=5, help="context cells each target cell takes labels from (5)"
    )
    parser.add_argument(
        "--temperature",
        type=float_in(0, low_open=True),
        default=0.1,
        help="softmax temperature of the affinities (0.1)",
    )
    parser.add_argument(
        "--radius",
        type=int_at_least(0),
        default=12,
        help="neighbourhood radius in cells of the base grid, scaled with grid density; 0: no limit (12)",
    )
    parser.add_argument(
        "--norm-mask",
        action="store_true",
        help="DINO's decode: rescale each upsampled label channel to [0, 1] before argmax",
    )
    parser.add_argument("--batch-size", type=int_at_least(1), default=4, help="frames per feature batch (4)")
    parser.add_argument(
        "--save-masks", action="store_true", help="also write predicted masks to OUT/masks/<variant>/<seq>/"
    )
    add_eval_args(parser, default_size=(224, 224))
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    config = DavisConfig(
        size=args.size,
        data=args.data,
        year=args.year,
        sequences=[s for s in args.sequences.split(",") if s] if args.sequences else None,
        resolution=args.resolution,
        max_frames=args.max_frames,
        n_last=args.n_last,
        topk=args.topk,
        temperature=args.temperature,
        radius=args.radius,
        norm_mask=args.norm_mask,
        batch_size=args.batch_size,
        masks_dir=Path(args.out) / "masks" if args.save_masks and args.out else None,
    )
    results = run_task(
        args,
        evaluate_davis,
        config,
        lambda row: (
            f"{row.variant}: J&F {row.metrics['J&F']:.1f} J {row.metrics['J']:.1f} "
            f"F {row.metrics['F']:.1f} ({row.ms_per_image:.0f} ms/frame features)"
        ),
    )
    announce_results(args)
    print(results.table())
    print(results.extra_markdown)
    return 0
