"""Will a batch fit? The memory a pipeline call needs, found without allocating it, against what is free.

`batch_peak_bytes` runs the pipeline once on the ``meta`` device (tensors with shapes but no data) under
`TensorMemoryTracker`, so the peak of the tensors alive at the same time -- the output and every
intermediate of the backbone and the upsampler -- is known exactly without allocating any of it,
whatever the upsampler is. `check_extraction_fits` compares it, plus the finished batches waiting to be
written, with the free memory of the device and of the host, and refuses a run that cannot fit before it
starts, instead of letting it die in the allocator or be killed for memory after loading.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch.func import functional_call

from .errors import FeatliftError
from .meters import TensorMemoryTracker
from .pipeline import FeaturePipeline

logger = logging.getLogger(__name__)

MEMINFO = Path("/proc/meminfo")
CGROUP = Path("/sys/fs/cgroup")
GIB = 2**30
PROBE_MARGIN = 64  # a batch whose input and output fit this many times over is not probed


def batch_peak_bytes(pipeline: FeaturePipeline, batch: int, size: tuple[int, int]) -> int:
    """Peak bytes of the tensors one ``pipeline`` call on ``batch`` images of `size` creates (in float32)."""
    meta = {
        name: torch.empty_like(tensor, device="meta")
        for name, tensor in [*pipeline.named_parameters(), *pipeline.named_buffers()]
    }
    amp, pipeline.amp = pipeline.amp, None  # autocast has no meta device; float32 is the upper bound
    try:
        with torch.inference_mode(), TensorMemoryTracker() as tracker:
            functional_call(pipeline, meta, (torch.empty(batch, 3, *size, device="meta"),), strict=False)
    finally:
        pipeline.amp = amp
    return tracker.peak


def _cgroup_free_bytes() -> int | None:
    """Memory left under this process's cgroup v2 limit (a container's), or None without a limit."""
    try:
        limit = (CGROUP / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int((CGROUP / "memory.current").read_text())
    except (OSError, ValueError):
        return None


def host_free_bytes() -> int | None:
    """Memory this process can still allocate on the host: ``MemAvailable``, or less under a cgroup limit."""
    free = None
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    if free is None and hasattr(os, "sysconf"):
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            free = None
    limited = _cgroup_free_bytes()
    if limited is not None:
        free = limited if free is None else min(free, limited)
    return free


def device_free_bytes(device: torch.device) -> int | None:
    """Free memory of a CUDA device; the host's for the CPU; None where it cannot be known."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        return host_free_bytes()
    return None


def check_extraction_fits(
    pipeline: FeaturePipeline,
    *,
    batch: int,
    size: tuple[int, int],
    device: str | torch.device,
    stored_dtype: torch.dtype,
    held_batches: int,
) -> None:
    """Refuse (`FeatliftError`, with the numbers and what to lower) an extraction that cannot fit in memory.

    Counted: one pipeline call on `batch` images on `device`, and `held_batches` batches of features
    held on the host in `stored_dtype` meanwhile (converted, or waiting to be written). The probe
    (`batch_peak_bytes`) runs every op of a call in Python, so a run is not probed when its input and
    output batch, times `PROBE_MARGIN`, fit.
    """
    device = torch.device(device)
    channels = pipeline.backbone.channels
    grid = pipeline.output_grid(*size)
    output = batch * channels * grid[0] * grid[1]
    held = held_batches * output * stored_dtype.itemsize
    device_free = device_free_bytes(device)
    host_free = host_free_bytes() if device.type != "cpu" else None
    held_on_device = held if device.type == "cpu" else 0
    # weights still on the host will take device memory once the pipeline moves there (before the call)
    weights = sum(
        t.nbytes for t in [*pipeline.parameters(), *pipeline.buffers()] if t.device.type != device.type
    )
    held_on_device += weights
    plain = (output + batch * 3 * size[0] * size[1]) * 4 * PROBE_MARGIN
    if (device_free is None or plain + held_on_device <= device_free) and (
        host_free is None or held <= host_free
    ):
        return
    try:
        compute = batch_peak_bytes(pipeline, batch, size)
    except (RuntimeError, NotImplementedError) as exc:  # an op without a meta kernel, or data-dependent
        logger.info(
            "cannot estimate the memory of %s, so it is not checked: %s", type(pipeline).__name__, exc
        )
        return
    what = f"one batch, {batch} x {channels} x {grid[0]} x {grid[1]} features at the output grid, with the "
    what += "backbone's and upsampler's intermediates"
    held_what = f"{held_batches} batches of features held for writing"
    extra = [f"{held_what}"] if device.type == "cpu" and held else []
    extra += [f"{weights / GIB:.1f} GiB of weights"] if weights else []
    checks = [(compute + held_on_device, str(device), device_free, ", and ".join([what, *extra]))]
    if device.type != "cpu":
        checks.append((held, "host memory", host_free, held_what))
    for need, place, free, reason in checks:
        logger.debug("memory: %.2f GiB needed on %s, %s bytes free", need / GIB, place, free)
        if free is not None and need > free:
            raise FeatliftError(
                f"extracting needs about {need / GIB:.1f} GiB on {place} ({reason}), but only "
                f"{free / GIB:.1f} GiB is free; lower --iters, --batch-size or --output-size"
            )
