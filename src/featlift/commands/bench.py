"""``featlift bench``: latency, throughput, peak memory, FLOPs and parameters of feature variants."""

from __future__ import annotations

import argparse
import logging

import torch

from ..bench import BenchSettings, find_max_size, run_benchmark, write_bench_results
from ..devices import resolve_device
from ..environment import environment
from ..errors import FeatliftError
from ..fileio import check_writable_dir
from ..process_memory import RssJob, measure_process_rss, upsampler_module_files
from ..variants import parse_variants
from .common import (
    VARIANT_GRAMMAR,
    add_backbone_args,
    add_device_arg,
    add_max_memory_arg,
    backbone_from_args,
    memory_defaults,
    positive_int,
    weights_from_args,
)
from .inference_args import add_inference_args, inference_options
from .numbers import int_at_least

logger = logging.getLogger(__name__)


def int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected comma-separated integers, e.g. 224,448"
        ) from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive integers, e.g. 224,448")
    return values


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="speed, memory, FLOPs and parameters of feature variants",
        description="Measure each variant at each size on random images: median latency per image (batch 1), "
        "throughput at several batch sizes, peak memory (live tensors on CPU, max allocated on CUDA), FLOPs, parameters, "
        "and the backbone and the upsampler alone. Writes OUT/bench.json and OUT/bench.md.",
    )
    add_backbone_args(parser)
    parser.add_argument(
        "--sizes", type=int_list, default=[224], help="base input sizes in pixels, e.g. 224,448,896"
    )
    parser.add_argument(
        "--variants",
        action="append",
        default=None,
        help=f"comma-separated variants: {VARIANT_GRAMMAR} (default none,bilinear,lift,input-2x)",
    )
    parser.add_argument(
        "--batch-sizes", type=int_list, default=[1, 4, 16], help="throughput batch sizes (default 1,4,16)"
    )
    parser.add_argument(
        "--repeats", type=positive_int, default=10, help="timed calls per measurement (default 10)"
    )
    parser.add_argument("--warmup", type=int_at_least(0), default=2, help="untimed calls first (default 2)")
    parser.add_argument(
        "--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument(
        "--out", default="bench", help="output folder for bench.json and bench.md (default ./bench)"
    )
    parser.add_argument(
        "--find-max-size",
        action="store_true",
        help="also find, per variant, the largest base size (first size doubled until out of memory) that fits at "
        "batch 1. Meant for CUDA; on CPU it stops at --max-size-cap, since the OS swaps rather than failing",
    )
    parser.add_argument(
        "--max-size-cap",
        type=positive_int,
        default=None,
        help="largest size --find-max-size tries (default: 16384 on CUDA, 1792 on CPU)",
    )
    parser.add_argument(
        "--process-rss",
        action="store_true",
        help="also measure, per size and variant at the first batch size, the RSS of a fresh process that loads "
        "the variant and runs it once: peak while loading, before the call, peak during it (CPU, Linux)",
    )
    parser.add_argument("--seed", type=int, default=0)
    add_inference_args(parser)
    add_device_arg(parser)
    add_max_memory_arg(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    check_writable_dir(args.out, "--out")  # before any measurement
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    backbone = backbone_from_args(args)
    specs = args.variants or ["none,bilinear,lift,input-2x"]
    variants = parse_variants(specs, backbone, memory_defaults(args))
    for size in args.sizes:
        for variant in variants:
            backbone.grid_size(*variant.input_size((size, size)))
    settings = BenchSettings(
        sizes=args.sizes,
        variants=[v.spec for v in variants],
        batch_sizes=args.batch_sizes,
        repeats=args.repeats,
        warmup=args.warmup,
        device=str(device),
        options=inference_options(args),
        seed=args.seed,
    )
    try:
        rows = run_benchmark(variants, settings)
    except RuntimeError as exc:
        if "out of memory" in str(exc) or "can't allocate memory" in str(exc):
            raise FeatliftError(
                f"out of memory on {device}: use smaller --sizes or --batch-sizes ({str(exc)[:200]})"
            ) from exc
        raise
    extra = {}
    if args.process_rss:
        if device.type != "cpu":
            raise FeatliftError("--process-rss measures CPU runs; use --device cpu")
        extra["process_rss"] = [
            measure_process_rss(
                RssJob(
                    backbone=args.backbone,
                    weights=weights_from_args(args),
                    layer=args.layer,
                    facet=args.facet,
                    variant=variant.spec,
                    size=size,
                    batch=settings.batch_sizes[0],
                    options=settings.options.to_dict(),
                    threads=args.threads,
                    modules=upsampler_module_files(
                        [type(variant.pipeline.upsampler)] if variant.pipeline.upsampler is not None else []
                    ),
                )
            ).to_dict()
            for size in args.sizes
            for variant in variants
        ]
    if args.find_max_size:
        cap = args.max_size_cap or (16384 if device.type == "cuda" else 1792)
        note = (
            "CUDA: doubled until torch.cuda.OutOfMemoryError"
            if device.type == "cuda"
            else (f"CPU: bounded by --max-size-cap {cap}; the OS may swap instead of failing")
        )
        extra["max_size_note"] = note
        extra["max_size"] = []
        for variant in variants:
            largest, failed = find_max_size(variant, min(args.sizes), device, cap)
            extra["max_size"].append(
                {"variant": variant.spec, "largest": largest, "failed": failed, "cap": cap}
            )
    env = environment(device)
    out = write_bench_results(args.out, rows, settings, env, extra)
    print((out / "bench.md").read_text())
    print(f"featlift bench: {len(rows)} rows -> {out / 'bench.json'}, {out / 'bench.md'}")
    return 0
