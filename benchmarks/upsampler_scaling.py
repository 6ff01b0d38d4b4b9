"""Time and memory of upsamplers alone as the output grows: 448², 1024², 2048² from one 224 px input.

For each variant and output size, a fresh Python process builds the backbone and the variant, computes the
real DINOv2 features of one image (16x16 tokens at 224 px), and then, on the upsampler alone:

- times one call (after a warm-up call at the smallest size, so one-time set-up is not counted); a method fitted
  per image (``featup-implicit``) is fitted in that call, with the backbone on its jittered views, and has no
  warm-up;
- records the process's peak RSS during that call above its RSS before it (what the machine has to have);
- with ``--tracker``, in a second call, the peak of the tensors the call holds at once
  (`featlift.meters.TensorMemoryTracker`, the CPU analogue of ``max_memory_allocated``).

"working" is each peak minus the output tensor itself (C x H x W x bytes of its dtype). The output is
allocated in ``--dtype`` (methods that compute in chunks write into it directly).

    python benchmarks/upsampler_scaling.py --variant jafar:CKPT --variant anyup:CKPT ... \
        [--sizes 448,1024,2048] [--dtype float32] [--threads 2] [--tracker] [--out DIR]

Writes ``DIR/results.json`` and ``DIR/results.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_WEIGHTS = "../shared/weights/vit_small_patch14_dinov2.imgfocus.safetensors"
DEFAULT_IMAGE = "../shared/data/imagenet-sample/n02088364_beagle.JPEG"
BASE = 224


def measure_one(args: argparse.Namespace) -> dict:
    """In this (fresh) process: time and peak memory of one upsampler call at ``args.one_size``."""
    import torch

    from featlift import create_backbone
    from featlift.images import image_to_tensor, load_image
    from featlift.meters import peak_memory_mib, timed_call
    from featlift.process_memory import peak_rss_mib, reset_peak_rss, rss_mib
    from featlift.variants import parse_variants

    torch.set_num_threads(args.threads)
    backbone = create_backbone("vit_small_patch14_dinov2.lvd142m", weights=args.weights).eval()
    defaults = {"output_dtype": args.dtype}
    if args.max_memory is not None:
        defaults["max_memory_mib"] = args.max_memory
    (variant,) = parse_variants([args.one], backbone, defaults)
    upsampler = variant.pipeline.upsampler
    per_image = upsampler.capabilities.fitting == "per-image"

    def call(size: tuple[int, int]) -> torch.Tensor:
        """One upsampling; a per-image method is fitted on the image first (the fit is part of its cost)."""
        if per_image:
            with torch.enable_grad():
                fitted = upsampler.fit_upsample(features, guide, size, variant.pipeline.features_of)
            return fitted.detach()
        return upsampler(features, guide, size)

    with torch.no_grad():
        normalized = backbone.normalize(image_to_tensor(load_image(args.image), (BASE, BASE))[None])
        features = backbone(normalized)
        guide = normalized if upsampler.capabilities.guide != "none" else None
        size = (args.one_size, args.one_size)
        if not per_image:  # first-call set-up, at a small size (a per-image fit has none worth a second fit)
            call((2 * features.shape[-2], 2 * features.shape[-1]))
        before = rss_mib()
        reset_peak_rss()
        out, seconds = timed_call(lambda: call(size))
        call_peak = peak_rss_mib() - before
        output_mib = out.numel() * out.element_size() / 2**20
        dtype = str(out.dtype).removeprefix("torch.")
        del out
        tracked = None
        if args.tracker:
            tracked = peak_memory_mib(lambda: call(size))
    return {
        "variant": args.one,
        "output": args.one_size,
        "dtype": dtype,
        "seconds": round(seconds, 3),
        "output_mib": round(output_mib, 1),
        "rss_peak_above_before_mib": round(call_peak, 1),
        "rss_working_mib": round(call_peak - output_mib, 1),
        "tracked_peak_mib": None if tracked is None else round(tracked, 1),
        "tracked_working_mib": None if tracked is None else round(tracked - output_mib, 1),
        "threads": args.threads,
        "parameters": sum(p.numel() for p in upsampler.parameters()),
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| variant | output | dtype | s | output MiB | RSS peak - output (MiB) | tracked peak - output (MiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| `{r['variant']}` | {r['output']}² | | failed: {r['error'][:80]} | | | |")
            continue
        tracked = "" if r["tracked_working_mib"] is None else f"{r['tracked_working_mib']:.0f}"
        lines.append(
            f"| `{r['variant']}` | {r['output']}² | {r['dtype']} | {r['seconds']:.2f} | {r['output_mib']:.0f} | "
            f"{r['rss_working_mib']:.0f} | {tracked} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", action="append", required=True, help="variant spec (repeatable)")
    parser.add_argument("--sizes", default="448,1024,2048", help="output sides (default 448,1024,2048)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16"))
    parser.add_argument("--max-memory", type=float, default=None, help="MiB budget of chunked methods")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--tracker", action="store_true", help="also the tensor tracker's peak (a second call)"
    )
    parser.add_argument("--weights", default=DEFAULT_WEIGHTS)
    parser.add_argument("--image", default=DEFAULT_IMAGE)
    parser.add_argument("--out", default="benchmarks/scaling_results")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--one-size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(measure_one(args)))
        return

    rows = []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    passed = [a for a in sys.argv[1:]]
    for spec in [s for item in args.variant for s in item.split(",") if s]:
        for size in [int(s) for s in args.sizes.split(",")]:
            command = [sys.executable, __file__, *passed, "--one", spec, "--one-size", str(size)]
            started = time.time()
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                row = {"variant": spec, "output": size, "error": done.stderr.strip().splitlines()[-1:]}
                row["error"] = " ".join(row["error"]) or f"exit {done.returncode}"
            else:
                row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(json.dumps(row), f"({time.time() - started:.0f} s in all)", flush=True)
            (out / "results.json").write_text(json.dumps(rows, indent=1))
            (out / "results.md").write_text(table(rows) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
