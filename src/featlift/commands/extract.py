"""``featlift extract INPUT...``: dense features for image files, folders and globs."""

from __future__ import annotations

import argparse
import logging

import torch

from ..devices import resolve_device
from ..errors import FeatliftError
from ..extract import extract_to_folder
from ..extract_distributed import extract_on_every_rank, is_main_rank
from ..images import collect_images
from ..pipeline import FeaturePipeline, resolve_upsampler
from ..upsamplers import available_upsamplers, get_upsampler_class
from ..variants import implied_options, option_value
from .common import (
    add_backbone_args,
    add_device_arg,
    add_layers_as_arg,
    add_max_memory_arg,
    backbone_from_args,
    memory_defaults,
    positive_int,
    size_arg,
)
from .inference_args import add_inference_args, inference_options

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "extract",
        help="extract (upsampled) ViT or CNN features for images, folders or globs",
        description="Write OUT/<relative path>.safetensors with `features` [C, H, W] for every input image. "
        "Existing outputs with the same settings, made from the image as it is now, are skipped; an output "
        "folder holds one set of settings. Unreadable images and non-finite features are reported and "
        "skipped (exit code 1). With several --layer values the file holds their channels concatenated "
        "(--layers-as concat) or one tensor features_layerN per layer (--layers-as separate).",
    )
    parser.add_argument(
        "inputs", nargs="+", metavar="INPUT", help="image files, folders (recursive) or glob patterns"
    )
    add_backbone_args(parser)
    add_layers_as_arg(parser)
    parser.add_argument(
        "--upsampler",
        default="lift",
        choices=["none", *available_upsamplers()],
        help="a registered upsampler: lift (default; the shipped checkpoint for the default backbone), bilinear, "
        "any other registered method, or none",
    )
    parser.add_argument(
        "--checkpoint", default=None, help="upsampler checkpoint folder (model.safetensors + config.json)"
    )
    parser.add_argument(
        "--iters",
        type=positive_int,
        default=None,
        help="LiFT's upsampling passes, each 2x (default 1, or as many as reach --output-size); "
        "short for --option iters=N",
    )
    parser.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help="optimisation steps of a method fitted on each image (featup-implicit: default 50, FeatUp's 1200); "
        "short for --option steps=N",
    )
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option of the upsampler, as in variant specs (e.g. iters=2); repeatable",
    )
    parser.add_argument(
        "--size",
        type=size_arg,
        default=(224, 224),
        help="input size S or HxW, a multiple of the patch (default 224)",
    )
    parser.add_argument(
        "--output-size", type=size_arg, default=None, help="resize the final feature map to S or HxW"
    )
    parser.add_argument("--out", default="features", help="output folder (default ./features)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="stored feature dtype")
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument(
        "--workers",
        type=int,
        default=2,
        help="image-decoding worker processes (0: decode in the main process)",
    )
    parser.add_argument("--overwrite", action="store_true", help="re-extract outputs that already exist")
    parser.add_argument(
        "--write-threads",
        type=int,
        default=1,
        help="threads writing files while the next batch is computed (0: write inline)",
    )
    add_inference_args(parser)
    add_device_arg(parser)
    add_max_memory_arg(parser)
    parser.set_defaults(run=run)


def upsampler_options_from_args(args: argparse.Namespace) -> dict:
    """``--option KEY=VALUE`` and ``--iters`` as the upsampler's typed options."""
    if args.upsampler in (None, "none"):
        if args.option or args.iters is not None or args.steps is not None:
            raise FeatliftError("--option/--iters/--steps: --upsampler none takes no options")
        return {}
    cls = get_upsampler_class(args.upsampler)
    if args.steps is not None and cls.capabilities.fitting != "per-image":
        per_image = [name for name in available_upsamplers() if is_per_image(name)]
        raise FeatliftError(
            f"--steps {args.steps}: upsampler {args.upsampler!r} is not fitted per image "
            f"(fitting {cls.capabilities.fitting!r}); --steps applies to {', '.join(per_image) or 'none'}"
        )
    # the stored dtype and the memory budget, for the methods that compute in chunks straight into their output
    options = implied_options(cls, {"output_dtype": args.dtype, **memory_defaults(args)})
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep:
            raise FeatliftError(f"--option {item!r}: expected KEY=VALUE")
        options[key.strip()] = option_value(cls, key.strip(), value.strip(), f"--option {item}")
    if args.iters is not None:
        options["iters"] = option_value(cls, "iters", str(args.iters), "--iters")
    if args.steps is not None:
        options["steps"] = option_value(cls, "steps", str(args.steps), "--steps")
    return options


def is_per_image(upsampler: str | None) -> bool:
    """True for a method optimised on each image at test time (``capabilities.fitting == "per-image"``)."""
    return (
        upsampler not in (None, "none") and get_upsampler_class(upsampler).capabilities.fitting == "per-image"
    )


def run(args: argparse.Namespace) -> int:
    items = collect_images(args.inputs)
    device = resolve_device(args.device)
    backbone = backbone_from_args(args)
    backbone.grid_size(*args.size)
    upsampler, checkpoint = resolve_upsampler(
        backbone, args.upsampler, args.checkpoint, upsampler_options_from_args(args)
    )
    if checkpoint:
        logger.info("upsampler checkpoint: %s", checkpoint)
    batch_size = args.batch_size
    if is_per_image(args.upsampler):
        # one fit per image: one image per batch, so each output is written when its fit ends and a rerun
        # (after a crash or Ctrl-C) redoes only the images not written yet
        upsampler.show_progress = not args.quiet
        if batch_size != 1:
            logger.info("%s is fitted on each image: extracting one image at a time", args.upsampler)
        batch_size = 1
    pipeline = FeaturePipeline(backbone, upsampler, output_size=args.output_size, checkpoint=checkpoint)
    grid = pipeline.output_grid(*args.size)
    logger.info("%d images -> %s, features [%d, %d, %d]", len(items), args.out, backbone.channels, *grid)
    report = extract_on_every_rank(  # extract_to_folder; under torchrun, this rank's shard
        extract_to_folder,
        pipeline,
        items,
        args.out,
        size=args.size,
        dtype=DTYPES[args.dtype],
        batch_size=batch_size,
        device=device,
        workers=max(0, args.workers),
        overwrite=args.overwrite,
        options=inference_options(args),
        writer_threads=max(0, args.write_threads),
        progress=not args.quiet,
    )
    if is_main_rank():  # under torchrun, rank 0 prints the whole run's summary
        print(f"featlift extract: {report.summary()} -> {args.out}")
        for _path, message in report.failed:
            print(f"  failed: {message}")
    return 0 if report.ok else 1
