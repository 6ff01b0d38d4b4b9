"""Effect of each inference speed option, side by side in one process: time ratios and output error.

Options: inference_mode vs no_grad, BatchNorm folding, channels-last, bf16 autocast, torch.compile (with
--compile). LiFT is timed alone on precomputed backbone features (1 and 2 passes), the backbone alone,
and the whole pipeline; every configuration of one group is called once per round, rounds repeated,
medians taken, so a busy machine slows them alike. Output error is against the plain float32 module.

    python benchmarks/speed_options.py --checkpoint CKPT --size 224 --repeats 20 --threads 2 --out bench-options
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

from featlift import create_backbone
from featlift.bench import time_interleaved
from featlift.environment import environment
from featlift.pipeline import FeaturePipeline, autocast, resolve_upsampler
from featlift.speedups import PLAIN, InferenceOptions, optimize_pipeline, optimize_upsampler

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"
DEFAULT_WEIGHTS = SHARED / "weights" / "vit_small_patch14_dinov2.imgfocus.safetensors"


def errors(output: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    output, reference = output.float(), reference.float()
    cosine = torch.nn.functional.cosine_similarity(output, reference, dim=1)
    return {
        "max_abs_diff": (output - reference).abs().max().item(),
        "min_cosine": cosine.min().item(),
        "mean_cosine": cosine.mean().item(),
        "reference_max_abs": reference.abs().max().item(),
    }


def run_group(name: str, configs: dict, reference: str, args, device) -> list[dict]:
    """Time every config of a group interleaved; compare each output to the `reference` config's."""
    with torch.inference_mode():
        outputs = {key: fn() for key, fn in configs.items()}
    times = time_interleaved(configs, device, repeats=args.repeats, warmup=args.warmup)
    base = statistics.median(times[reference])
    rows = []
    for key in configs:
        median = statistics.median(times[key])
        rows.append(
            {
                "group": name,
                "config": key,
                "ms": median * 1000,
                "vs_reference": median / base,
                **errors(outputs[key], outputs[reference]),
            }
        )
        print(
            f"{name:>22} | {key:<28} | {median * 1000:8.2f} ms | x{median / base:5.2f} | "
            f"max|d| {rows[-1]['max_abs_diff']:.2e} | min cos {rows[-1]['min_cosine']:.6f}",
            flush=True,
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbone", default="vit_small_patch14_dinov2.lvd142m")
    parser.add_argument("--weights", default=str(DEFAULT_WEIGHTS))
    parser.add_argument("--checkpoint", default=None, help="LiFT checkpoint (default: the shipped one)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (slow to build)")
    parser.add_argument("--out", default="bench-options")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    load_before = os.getloadavg()
    backbone = create_backbone(args.backbone, weights=args.weights)
    lift, checkpoint = resolve_upsampler(backbone, "lift", args.checkpoint)
    lift.eval()
    images = torch.rand(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        normalized = backbone.normalize(images)
        features = backbone(normalized)
    channels_last_image = normalized.contiguous(memory_format=torch.channels_last)
    channels_last_features = features.contiguous(memory_format=torch.channels_last)

    variants = {
        "plain": optimize_upsampler(lift, PLAIN),
        "fold-bn": optimize_upsampler(lift, InferenceOptions(channels_last=False)),
        "fold-bn+channels-last": optimize_upsampler(lift, InferenceOptions()),
    }
    if args.compile:
        variants["fold-bn+compile"] = optimize_upsampler(
            lift, InferenceOptions(channels_last=False, compile=True)
        )

    grid = tuple(features.shape[-2:])

    def lift_call(module, image, iters, amp=None, grad_mode=torch.inference_mode):
        """LiFT alone for `iters` passes: the output size 2**iters times the grid (LiFT's passes for it)."""
        output_size = (grid[0] * 2**iters, grid[1] * 2**iters)

        def call():
            with grad_mode(), autocast(device, amp):
                feats = channels_last_features if image is channels_last_image else features
                return module(feats, image, output_size)

        return call

    rows = []
    for iters in (1, 2):
        configs = {
            "plain (no_grad)": lift_call(variants["plain"], normalized, iters, grad_mode=torch.no_grad),
            "plain (inference_mode)": lift_call(variants["plain"], normalized, iters),
            "fold-bn": lift_call(variants["fold-bn"], normalized, iters),
            "fold-bn+channels-last": lift_call(variants["fold-bn+channels-last"], channels_last_image, iters),
            "fold-bn+bf16": lift_call(variants["fold-bn"], normalized, iters, amp="bf16"),
            "fold-bn+channels-last+bf16": lift_call(
                variants["fold-bn+channels-last"], channels_last_image, iters, amp="bf16"
            ),
        }
        if args.compile:
            configs["fold-bn+compile"] = lift_call(variants["fold-bn+compile"], normalized, iters)
        rows += run_group(f"LiFT alone, iters={iters}", configs, "plain (inference_mode)", args, device)

    def backbone_call(amp=None):
        def call():
            with autocast(device, amp):
                return backbone(normalized)

        return call

    rows += run_group(
        "backbone alone", {"fp32": backbone_call(), "bf16": backbone_call("bf16")}, "fp32", args, device
    )

    plain = FeaturePipeline(backbone, lift)  # one pass: the output grid twice the tokens
    pipelines = {
        "plain": plain,
        "fold-bn": optimize_pipeline(plain, InferenceOptions(channels_last=False)),
        "fold-bn+channels-last (default)": optimize_pipeline(plain, InferenceOptions()),
        "default+bf16": optimize_pipeline(plain, InferenceOptions(amp="bf16")),
    }
    rows += run_group(
        "pipeline (bb+LiFT)",
        {k: (lambda p=p: p(images)) for k, p in pipelines.items()},
        "plain",
        args,
        device,
    )

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**environment(device), "load_average_before": [round(x, 2) for x in load_before]}
    settings = {"checkpoint": checkpoint, "size": args.size, "repeats": args.repeats, "warmup": args.warmup}
    (out / "options.json").write_text(
        json.dumps({"settings": settings, "environment": env, "rows": rows}, indent=2)
    )
    lines = [
        f"size {args.size}, {env['threads']} threads, median of {args.repeats} interleaved rounds; "
        f"load average before {env['load_average_before']}, after {env.get('load_average')}",
        "",
        "| measured | option | ms | time vs reference | max abs diff | min cosine |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['group']} | {r['config']} | {r['ms']:.2f} | {r['vs_reference']:.3f} | "
            f"{r['max_abs_diff']:.2e} | {r['min_cosine']:.6f} |"
        )
    (out / "options.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
