"""Folder extraction throughput (decode + backbone + LiFT + write) next to the sum of its parts measured alone.

On the first N images of ../shared/data/imagenet-sample (sorted by name), at one size and batch size:

- parts alone, one after the other in this process: decode (read + resize, serial), compute (the pipeline
  on already-decoded batches, with the default inference options), write (one .safetensors per image);
- end to end: ``extract_to_folder`` -- what ``featlift extract FOLDER`` runs after loading the model --
  under several settings, from fully serial to overlapped (decode workers + writer thread).

Settings and parts are interleaved round by round and medians reported, so load from other processes
hits all of them alike. The ratio that matters is end-to-end time / compute-alone time.

    python benchmarks/speed_extract.py --checkpoint CKPT --count 96 --rounds 3 --threads 2 --out bench-extract
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from featlift import create_backbone, extract_to_folder
from featlift.environment import environment
from featlift.extract import pipeline_metadata
from featlift.fileio import save_safetensors_atomic
from featlift.images import collect_images, image_to_tensor, load_image
from featlift.pipeline import FeaturePipeline, resolve_upsampler
from featlift.speedups import InferenceOptions, optimize_pipeline

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"
DEFAULT_WEIGHTS = SHARED / "weights" / "vit_small_patch14_dinov2.imgfocus.safetensors"
DEFAULT_IMAGES = SHARED / "data" / "imagenet-sample"

# name -> (decode worker processes, writer threads, inference options)
SETTINGS = {
    "serial-no-fold": (
        0,
        0,
        InferenceOptions(fold_bn=False),
    ),  # before this work: decode, compute, write in turn
    "serial": (0, 0, InferenceOptions()),
    "workers0-writer": (0, 1, InferenceOptions()),
    "workers1-writer": (1, 1, InferenceOptions()),
    "workers2-writer": (2, 1, InferenceOptions()),  # the `featlift extract` defaults
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbone", default="vit_small_patch14_dinov2.lvd142m")
    parser.add_argument("--weights", default=str(DEFAULT_WEIGHTS))
    parser.add_argument("--checkpoint", default=None, help="LiFT checkpoint (default: the shipped one)")
    parser.add_argument("--images", default=str(DEFAULT_IMAGES))
    parser.add_argument("--count", type=int, default=96)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--settings", default=",".join(SETTINGS), help="comma-separated subset of: " + ", ".join(SETTINGS)
    )
    parser.add_argument("--out", default="bench-extract")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    size = (args.size, args.size)
    items = collect_images([args.images])[: args.count]
    backbone = create_backbone(args.backbone, weights=args.weights)
    lift, checkpoint = resolve_upsampler(backbone, "lift", args.checkpoint)
    pipeline = FeaturePipeline(backbone, lift, checkpoint=checkpoint)  # one pass
    fast = optimize_pipeline(pipeline, InferenceOptions())
    metadata = {**pipeline_metadata(pipeline, size, torch.float32), "amp": "none"}
    settings = [s for s in args.settings.split(",") if s]
    scratch = Path(tempfile.mkdtemp(prefix="featlift-bench-extract-"))
    times: dict[str, list[float]] = {name: [] for name in ["decode", "compute", "write", *settings]}

    def decode() -> list[torch.Tensor]:
        return [image_to_tensor(load_image(item.path), size) for item in items]

    batches = list(torch.split(torch.stack(decode()), args.batch_size))
    with torch.inference_mode():
        fast(batches[0])  # warm-up
        features = torch.cat([fast(b) for b in batches])
    try:
        for round_index in range(args.rounds):
            start = time.perf_counter()
            decode()
            times["decode"].append(time.perf_counter() - start)
            start = time.perf_counter()
            with torch.inference_mode():
                for batch in batches:
                    fast(batch)
            times["compute"].append(time.perf_counter() - start)
            start = time.perf_counter()
            for item, feature in zip(items, features, strict=True):
                path = scratch / "parts" / f"{item.relative}.safetensors"
                save_safetensors_atomic(
                    {"features": feature}, path, metadata={**metadata, "source": str(item.path)}
                )
            times["write"].append(time.perf_counter() - start)
            for name in settings:
                workers, writers, options = SETTINGS[name]
                out = scratch / f"e2e-{round_index}"
                start = time.perf_counter()
                report = extract_to_folder(
                    pipeline,
                    items,
                    out,
                    size=size,
                    batch_size=args.batch_size,
                    workers=workers,
                    writer_threads=writers,
                    options=options,
                    overwrite=True,
                    progress=False,
                )
                times[name].append(time.perf_counter() - start)
                assert len(report.written) == len(items), report.summary()
                shutil.rmtree(out)
            print(
                f"round {round_index + 1}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()),
                flush=True,
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    median = {name: statistics.median(v) for name, v in times.items()}
    parts = median["decode"] + median["compute"] + median["write"]
    n = len(items)
    env = {**environment(torch.device("cpu")), "load_average_before": [round(x, 2) for x in load_before]}
    result = {
        "settings": {
            "count": n,
            "size": args.size,
            "batch_size": args.batch_size,
            "rounds": args.rounds,
            "checkpoint": checkpoint,
        },
        "environment": env,
        "seconds": times,
        "median_seconds": median,
        "images_per_second": {k: n / v for k, v in median.items()},
        "vs_compute": {k: v / median["compute"] for k, v in median.items()},
        "sum_of_parts_seconds": parts,
    }
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "extract.json").write_text(json.dumps(result, indent=2))
    lines = [
        f"{n} images of imagenet-sample, {args.size} px, batch {args.batch_size}, LiFT 1 pass, {env['threads']} threads, "
        f"median of {args.rounds} interleaved rounds; load average before {env['load_average_before']}, "
        f"after {env.get('load_average')}",
        "",
        "| measured | seconds | images / s | time / compute alone |",
        "|---|---|---|---|",
    ]
    for name in ["decode", "compute", "write"]:
        lines.append(
            f"| {name} alone | {median[name]:.2f} | {n / median[name]:.1f} | {median[name] / median['compute']:.3f} |"
        )
    lines.append(f"| sum of the parts | {parts:.2f} | {n / parts:.1f} | {parts / median['compute']:.3f} |")
    for name in settings:
        lines.append(
            f"| end to end: {name} | {median[name]:.2f} | {n / median[name]:.1f} | "
            f"{median[name] / median['compute']:.3f} |"
        )
    (out_dir / "extract.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
