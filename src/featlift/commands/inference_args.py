"""``--no-fold-bn``, ``--no-channels-last``, ``--amp``, ``--compile``: the speed options of `featlift.speedups`
as flags, for every command that runs a pipeline (``bench``, ``extract``)."""

from __future__ import annotations

import argparse

from ..pipeline import AMP_DTYPES
from ..speedups import InferenceOptions


def add_inference_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("inference speed options")
    group.add_argument(
        "--no-fold-bn",
        dest="fold_bn",
        action="store_false",
        help="keep BatchNorm layers separate (default: fold them into the convolutions; same outputs)",
    )
    group.add_argument(
        "--no-channels-last",
        dest="channels_last",
        action="store_false",
        help="keep the upsampler in NCHW layout (default: channels-last, faster on CPU; same outputs)",
    )
    group.add_argument(
        "--amp",
        choices=sorted(AMP_DTYPES),
        default=None,
        help="autocast backbone and upsampler to bf16/fp16 (faster, changes outputs slightly)",
    )
    group.add_argument("--compile", action="store_true", help="torch.compile the upsampler (slow first call)")


def inference_options(args: argparse.Namespace) -> InferenceOptions:
    return InferenceOptions(
        fold_bn=args.fold_bn, channels_last=args.channels_last, amp=args.amp, compile=args.compile
    )
