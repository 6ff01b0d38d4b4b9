"""Peak resident memory (RSS) of one variant call, measured in a fresh process (Linux).

Inside one long-lived process RSS hardly moves once warm-up has run: the allocator keeps the memory it
freed, so a later variant reuses what an earlier one left behind. A fresh process per variant gives the
numbers a user sees. ``python -m featlift.process_memory`` builds the backbone and the variant, makes
the random input, records its RSS, resets the kernel's peak-RSS mark (``/proc/self/clear_refs``), runs
the variant once, and prints, as JSON: the peak while loading, the RSS before the call, and the peak
during the call. The parent (`measure_process_rss`) runs one such child per variant.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import FeatliftError

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass
class ProcessRss:
    """RSS of a fresh process in MiB: peak while loading, level before the call, and peak during it."""

    variant: str
    size: int
    batch: int
    load_peak_mib: float
    before_call_mib: float
    call_peak_mib: float

    @property
    def call_adds_mib(self) -> float:
        return max(0.0, self.call_peak_mib - self.before_call_mib)

    @property
    def process_peak_mib(self) -> float:
        return max(self.load_peak_mib, self.call_peak_mib)

    def to_dict(self) -> dict:
        values = {
            **asdict(self),
            "call_adds_mib": self.call_adds_mib,
            "process_peak_mib": self.process_peak_mib,
        }
        return {k: round(v, 1) if isinstance(v, float) else v for k, v in values.items()}


def _status_kib(field: str) -> int:
    for line in STATUS.read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise FeatliftError(f"{STATUS} has no {field} line")


def rss_mib() -> float:
    """Resident memory of this process now."""
    return _status_kib("VmRSS") / 1024


def peak_rss_mib() -> float:
    """Peak resident memory of this process since it started its program or since `reset_peak_rss`.

    Read from /proc, not ``getrusage``: on Linux a child's ``ru_maxrss`` starts at the RSS of the parent
    it was forked from, which would count the measuring process's own memory.
    """
    return _status_kib("VmHWM") / 1024


def reset_peak_rss() -> None:
    """Set the peak-RSS mark to the current RSS (Linux >= 4.0)."""
    CLEAR_REFS.write_text("5")


def check_supported() -> None:
    if not STATUS.is_file() or not CLEAR_REFS.exists():
        raise FeatliftError(
            "measuring peak RSS per call needs Linux (/proc/self/status and /proc/self/clear_refs)"
        )


def run_child(argv: list[str]) -> dict:
    """Run a measuring child; return the JSON object it printed last."""
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise FeatliftError(
            f"the memory-measuring process failed (exit {done.returncode}):\n{done.stderr[-1500:]}"
        )
    try:
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise FeatliftError(
            f"the memory-measuring process printed no result: {done.stdout[-300:]!r}"
        ) from None


def measure_process_rss(
    backbone_argv: list[str], spec: str, size: int, batch: int, threads: int | None = None
) -> ProcessRss:
    """RSS of a fresh process that loads the variant `spec` (the backbone from `backbone_argv`, e.g.
    ``["--backbone", NAME, "--weights", F]`` plus inference flags) and runs it once on `batch` images."""
    check_supported()
    argv = [sys.executable, "-m", "featlift.process_memory", *backbone_argv]
    argv += ["--variant", spec, "--size", str(size), "--batch", str(batch)]
    if threads:
        argv += ["--threads", str(threads)]
    result = run_child(argv)
    return ProcessRss(
        spec, size, batch, result["load_peak_mib"], result["before_call_mib"], result["call_peak_mib"]
    )


def main(argv: list[str] | None = None) -> int:
    """The child: load, measure, call once, measure, print JSON (CPU only)."""
    from .commands.bench import add_inference_args, inference_options
    from .commands.common import add_backbone_args, backbone_from_args

    parser = argparse.ArgumentParser(prog="python -m featlift.process_memory")
    add_backbone_args(parser)
    add_inference_args(parser)
    parser.add_argument("--variant", required=True)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    check_supported()

    import gc

    import torch

    from .bench import random_images
    from .inference import optimize_pipeline
    from .variants import parse_variant

    if args.threads:
        torch.set_num_threads(args.threads)
    variant = parse_variant(args.variant, backbone_from_args(args))
    variant.pipeline = optimize_pipeline(variant.pipeline, inference_options(args)).eval()
    images = random_images(args.batch, variant.input_size((args.size, args.size)), torch.device("cpu"))
    gc.collect()
    load_peak, before = peak_rss_mib(), rss_mib()
    reset_peak_rss()
    with torch.inference_mode():
        variant(images)
    result = {"load_peak_mib": load_peak, "before_call_mib": before, "call_peak_mib": peak_rss_mib()}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
