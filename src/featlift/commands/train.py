"""``featlift train IMAGES``: self-supervised training of an upsampler (LiFT by default) on any folder of images."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
from dataclasses import asdict

from ..train import LOSSES, TrainConfig, train
from ..upsamplers import available_upsamplers, get_upsampler_class
from ..variants import parse_training_spec
from .common import add_backbone_args, add_device_arg, positive_int, weights_from_args

logger = logging.getLogger(__name__)

# TrainConfig fields set by a flag without a value: field -> (the value the flag sets, the flag)
_FLAGS = {
    "residual": (False, "--no-residual"),
    "augment": (True, "--augment"),
    "use_cache": (False, "--no-cache"),
    "resume": (True, "--resume"),
    "overwrite": (True, "--overwrite"),
    "progress": (False, "--no-progress"),
}


def config_command(config: TrainConfig) -> str:
    """The `featlift train` command line that gives `config` (options at their defaults left out)."""
    defaults = TrainConfig(images="", out="")
    parts = ["featlift", "train", config.images, "--out", config.out]
    for name, value in asdict(config).items():
        if name in ("images", "out", "command", "cache_dtype", "upsampler_args"):
            continue
        if name == "upsampler":
            spec = ":".join([value, *(f"{k}={v}" for k, v in config.upsampler_args.items())])
            if spec != defaults.upsampler:
                parts += ["--upsampler", spec]
            continue
        if value == getattr(defaults, name):
            continue
        if name in _FLAGS:
            if value == _FLAGS[name][0]:
                parts.append(_FLAGS[name][1])
        elif value is not None:
            parts += ["--" + name.replace("_", "-"), str(value)]
    return " ".join(shlex.quote(str(p)) for p in parts)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{value} must be in [0, 1)")
    return value


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train an upsampler (LiFT by default) self-supervised on a folder of images",
        description="Train an upsampler for a frozen ViT on any folder tree of images (no labels). Default "
        "objective (LiFT paper): loss(LiFT(img/2, f(img/2)), f(img)) + loss(LiFT(img/4, f(img/4)), f(img/2)). Backbone "
        "features are cached on disk, so epochs after the first skip the backbone. RUN_DIR gets model.safetensors "
        "+ config.json (usable with `featlift extract --checkpoint RUN_DIR`), train_state.safetensors for --resume, "
        "and train_log.jsonl; an existing run or checkpoint there is only continued (--resume) or replaced "
        "(--overwrite), never silently overwritten. Under `torchrun --nproc-per-node N -m featlift train ...` it "
        "trains with DDP.",
    )
    parser.add_argument("images", metavar="IMAGES", help="folder of images (recursive; jpg, png, webp, ...)")
    add_backbone_args(parser)
    parser.add_argument("--out", required=True, metavar="RUN_DIR", help="run folder: checkpoint, state, log")
    trainable = [name for name in available_upsamplers() if get_upsampler_class(name).trainable]
    parser.add_argument(
        "--upsampler",
        default="lift",
        type=lambda spec: parse_training_spec(spec, trainable),
        metavar="NAME[:key=value...]",
        help=f"upsampler to train (default lift): {', '.join(trainable)}; key=value sets a constructor setting "
        "that its checkpoint stores, e.g. fade:gating=false",
    )
    parser.add_argument(
        "--objective",
        default=None,
        metavar="NAME",
        help="registered training objective (default: the one the upsampler declares: lift for lift, carafe, "
        "sapa, fade and dysample; jafar, anyup, uplift, naf and loftup for their own; featup for featup-jbu)",
    )
    parser.add_argument(
        "--no-residual",
        dest="residual",
        action="store_false",
        help="the paper-exact LiFT (no bilinear skip); default: residual LiFT (bilinear skip, zero-init head), "
        "which learns much faster from few images",
    )
    parser.add_argument("--epochs", type=positive_int, default=5, help="default 5")
    parser.add_argument(
        "--batch-size", type=positive_int, default=8, help="global batch (split over DDP ranks), default 8"
    )
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate, default 1e-3")
    parser.add_argument(
        "--loss",
        choices=LOSSES,
        default="cosine",
        help="the distance of the lift objective, default cosine (jafar, anyup and featup use their originals' own)",
    )
    parser.add_argument(
        "--image-size",
        type=positive_int,
        default=448,
        help="training image size S (square); every view the objective needs must be a whole number of patches "
        "(lift: S, S/2 and S/4; default 448)",
    )
    parser.add_argument(
        "--augment",
        action="store_true",
        help="photometric jitter (ColorJitter 0.2 x4) of the guide images only; cached features stay valid",
    )
    parser.add_argument(
        "--cache", default=None, metavar="DIR", help="backbone feature cache folder (default RUN_DIR/cache)"
    )
    parser.add_argument(
        "--no-cache", dest="use_cache", action="store_false", help="compute backbone features every epoch"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in RUN_DIR after its last completed epoch, up to --epochs in all",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run or checkpoint already in RUN_DIR with a new run (its feature cache is reused)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of init, split, data order and jitter (default 0)"
    )
    parser.add_argument(
        "--val-fraction", type=_fraction, default=0.1, help="held-out fraction of the images (default 0.1)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="image-loading worker processes (default 0: in the main process)",
    )
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    add_device_arg(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    upsampler, upsampler_args = args.upsampler if isinstance(args.upsampler, tuple) else (args.upsampler, {})
    config = TrainConfig(
        images=args.images,
        out=args.out,
        backbone=args.backbone,
        weights=weights_from_args(args),
        layer=args.layer,
        facet=args.facet,
        upsampler=upsampler,
        upsampler_args=upsampler_args,
        objective=args.objective,
        residual=args.residual,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        loss=args.loss,
        image_size=args.image_size,
        augment=args.augment,
        cache=args.cache,
        use_cache=args.use_cache,
        resume=args.resume,
        overwrite=args.overwrite,
        seed=args.seed,
        val_fraction=args.val_fraction,
        device=args.device,
        workers=max(0, args.workers),
        progress=args.progress and not args.quiet,
    )
    config.command = config_command(config)
    result = train(config)
    final = result.final
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    if result.start_epoch == result.epochs:
        print(
            f"featlift train: {result.run_dir} has already trained all {result.epochs} epochs; nothing to do "
            f"(pass --epochs N with N > {result.epochs} to train it further)"
        )
    else:
        lift, bilinear = final.get("val_cosine_lift"), final.get("val_cosine_bilinear")
        val = (
            f"; validation cosine to the {args.image_size} px features: LiFT {lift}, bilinear {bilinear}"
            if lift
            else ""
        )
        print(
            f"featlift train: {result.epochs} epochs on {result.train_images} images "
            f"({result.skipped_images} unreadable skipped) in {result.wall_time_s:.1f} s{val} -> {result.run_dir}"
        )
    return 0
