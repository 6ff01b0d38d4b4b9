"""Speed and peak memory of the featlift.ops operators (CARAFE, SAPA-I/B/G, FADE, FADE-Lite).

One forward pass (no autograd) on a ``C``-channel ``size x size`` low-res map at 2x, and at 4x as two 2x steps
(two modules, as in a decoder: 32 -> 64 -> 128). The guided operators get a ``C``-channel encoder guide at each
step's output size (FADE's gate needs guide and features of the same width). Time: the median of ``--repeats``
timed calls after one warm-up call, ``--threads`` intra-op threads. Peak memory: a separate call under
featlift.meters.peak_memory_mib (CPU: the tracked tensors' peak, which counts the output, and the inputs'
storages, which a band's slices share), reported with the output's own size alongside.

    PYTHONPATH=src python benchmarks/ops_speed.py --threads 1 --out /tmp/ops-speed.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from featlift.meters import peak_memory_mib
from featlift.ops import CARAFE, FADE, SAPA

OPERATORS = {
    "carafe": lambda c, mib: CARAFE(c, max_memory_mib=mib),
    "sapa-i": lambda c, mib: SAPA(c, c, variant="I", max_memory_mib=mib),
    "sapa-b": lambda c, mib: SAPA(c, c, variant="B", max_memory_mib=mib),
    "sapa-g": lambda c, mib: SAPA(c, c, variant="G", max_memory_mib=mib),
    "fade": lambda c, mib: FADE(c, c, max_memory_mib=mib),
    "fade-lite": lambda c, mib: FADE(c, c, lite=True, max_memory_mib=mib),
}


def chain(name: str, channels: int, steps: int, max_memory_mib: float | None):
    """`steps` fresh modules of operator `name`, one per 2x step, in eval mode."""
    modules = [OPERATORS[name](channels, max_memory_mib).eval() for _ in range(steps)]
    return modules


def run_chain(modules, features: torch.Tensor, guides: list[torch.Tensor | None]) -> torch.Tensor:
    for module, guide in zip(modules, guides, strict=True):
        features = module(features) if guide is None else module(features, guide)
    return features


def measure(
    name: str, channels: int, size: int, steps: int, repeats: int, max_memory_mib: float | None
) -> dict:
    torch.manual_seed(0)
    modules = chain(name, channels, steps, max_memory_mib)
    features = torch.randn(1, channels, size, size)
    guided = name != "carafe"
    guides = [
        torch.randn(1, channels, size * 2**k, size * 2**k) if guided else None for k in range(1, steps + 1)
    ]
    with torch.inference_mode():
        run_chain(modules, features, guides)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            out = run_chain(modules, features, guides)
            times.append(time.perf_counter() - start)
    peak = peak_memory_mib(lambda: run_chain(modules, features, guides))
    return {
        "operator": name,
        "factor": 2**steps,
        "input": [1, channels, size, size],
        "output": list(out.shape),
        "parameters": sum(p.numel() for m in modules for p in m.parameters()),
        "seconds_median": statistics.median(times),
        "seconds_all": times,
        "peak_memory_mib": peak,
        "output_mib": out.numel() * out.element_size() / 2**20,
        "inputs_mib": sum(t.numel() * 4 for t in [features, *[g for g in guides if g is not None]]) / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--operators", default=",".join(OPERATORS), help="comma-separated, of: " + ", ".join(OPERATORS)
    )
    parser.add_argument("--channels", type=int, default=384)
    parser.add_argument("--size", type=int, default=32, help="low-res side of the input map")
    parser.add_argument("--factors", default="2,4", help="comma-separated powers of two (4 = two 2x steps)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--max-memory-mib", type=float, default=None, help="each operator's budget (None: 512)"
    )
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.operators.split(","):
        if name not in OPERATORS:
            parser.error(f"--operators: unknown operator {name!r}, expected some of {', '.join(OPERATORS)}")
        for factor in (int(f) for f in args.factors.split(",")):
            steps = factor.bit_length() - 1
            if factor < 2 or 2**steps != factor:
                parser.error(f"--factors: {factor} is not a power of two >= 2")
            row = measure(name, args.channels, args.size, steps, args.repeats, args.max_memory_mib)
            rows.append(row)
            print(
                f"{name:10s} {factor}x {row['input']} -> {row['output']}: {row['seconds_median'] * 1000:8.1f} ms, "
                f"peak {row['peak_memory_mib']:7.1f} MiB (output {row['output_mib']:.1f}, inputs "
                f"{row['inputs_mib']:.1f}), {row['parameters']} parameters",
                flush=True,
            )
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"threads": args.threads, "torch": torch.__version__, "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
