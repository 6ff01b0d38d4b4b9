"""Peak resident memory (RSS) of one variant call, measured in a fresh process (Linux).

This is a different quantity from `featlift.meters.peak_memory_mib`, featlift's one in-process meter (the
peak of the tensors one call creates): inside one long-lived process RSS hardly moves once warm-up has
run, because the allocator keeps the memory it freed and a later variant reuses what an earlier one left
behind. A fresh process per variant gives the numbers a user sees, libraries and weights included.

`measure_process_rss` runs ``python -m featlift.process_memory JOB`` once per variant, with the `RssJob`
as JSON: the child imports the modules that register upsamplers defined outside featlift, builds the
backbone and the variant, makes the random input, records its RSS, resets the kernel's peak-RSS mark
(``/proc/self/clear_refs``), runs the variant once, and prints, as JSON: the peak while loading, the RSS
before the call, and the peak during the call.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import FeatliftError
from .plugins import import_file

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


@dataclass
class RssJob:
    """What a measuring child loads and runs: the backbone, the variant `spec`, `batch` images of `size`.

    `modules` (module name -> file) register upsamplers defined outside featlift (a user's module, a test
    file); the child imports them before it parses the variant (see `upsampler_module_files`).
    """

    backbone: str
    variant: str
    size: int
    batch: int = 1
    weights: str | None = None
    layer: int | None = None
    facet: str = "token"
    options: dict = field(default_factory=dict)  # `featlift.speedups.InferenceOptions` as a dict
    threads: int | None = None
    modules: dict[str, str] = field(default_factory=dict)


def upsampler_module_files(upsampler_classes) -> dict[str, str]:
    """Module name -> source file, for those of `upsampler_classes` defined outside featlift.

    A fresh process imports featlift's own methods by itself; one registered elsewhere (a user's module,
    a test file, a script) exists there only once its module has been imported again.
    """
    files = {}
    for cls in upsampler_classes:
        module = sys.modules.get(cls.__module__)
        if module is None or module.__name__.split(".")[0] == "featlift":
            continue
        path = getattr(module, "__file__", None)
        if not path:
            raise FeatliftError(
                f"upsampler {cls.name!r} is defined in {cls.__module__!r}, which has no file, so a fresh "
                "process cannot import it; define it in a module file to measure its process RSS"
            )
        files[module.__name__] = str(path)
    return files


def measure_process_rss(job: RssJob) -> ProcessRss:
    """RSS of a fresh process that loads the variant of `job` and runs it once on ``job.batch`` images."""
    check_supported()
    result = run_child([sys.executable, "-m", "featlift.process_memory", json.dumps(asdict(job))])
    return ProcessRss(
        job.variant,
        job.size,
        job.batch,
        result["load_peak_mib"],
        result["before_call_mib"],
        result["call_peak_mib"],
    )


def run_job(job: RssJob) -> dict:
    """The child's work: load, measure, call once, measure (CPU only); returns the numbers."""
    import gc

    import torch

    from .backbones import create_backbone
    from .bench import random_images
    from .speedups import InferenceOptions, optimize_pipeline
    from .variants import parse_variant

    for name, path in job.modules.items():
        import_file(path, name)
    if job.threads:
        torch.set_num_threads(job.threads)
    backbone = create_backbone(job.backbone, weights=job.weights, layer=job.layer, facet=job.facet)
    variant = parse_variant(job.variant, backbone)
    variant.pipeline = optimize_pipeline(variant.pipeline, InferenceOptions(**job.options)).eval()
    images = random_images(job.batch, variant.input_size((job.size, job.size)), torch.device("cpu"))
    gc.collect()
    load_peak, before = peak_rss_mib(), rss_mib()
    reset_peak_rss()
    with torch.inference_mode():
        variant(images)
    return {"load_peak_mib": load_peak, "before_call_mib": before, "call_peak_mib": peak_rss_mib()}


def main(argv: list[str] | None = None) -> int:
    """The child: ``python -m featlift.process_memory JOB``, JOB an `RssJob` as JSON; prints the result as JSON."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(
            "usage: python -m featlift.process_memory JOB_JSON (see featlift.process_memory.RssJob)",
            file=sys.stderr,
        )
        return 2
    check_supported()
    print(json.dumps(run_job(RssJob(**json.loads(argv[0])))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
