"""Speed, memory, FLOPs and parameters of feature variants (``featlift bench``).

For each input size ``S`` and variant (``none``, ``bilinear``, ``lift:iters=2``, ``input-2x``, ...), on
random images of ``variant.input_size((S, S))``:

- latency: median wall time per image at batch 1 over ``repeats`` calls, after ``warmup`` calls;
- throughput: images/s at each batch size (batch / median time of one call);
- peak memory of one call (`featlift.meters.peak_memory_mib`): ``max_memory_allocated`` on CUDA; on CPU
  the peak of live tensors the call creates (RSS barely moves once the allocator has cached memory from
  warm-up; ``--process-rss`` measures RSS in a fresh process per variant instead, see `featlift.process_memory`);
- FLOPs of one image (``torch.utils.flop_counter.FlopCounterMode``: matmuls, convolutions and
  attention; elementwise ops are not counted) and parameter counts;
- stages, measured alone: the backbone on the variant's input, and the upsampler given precomputed
  backbone features, so that ``upsampler / backbone`` ratios can be formed.

All calls of one size and batch size are interleaved round by round (variant A, B, C, A, B, C, ...), so
a busy machine slows every variant alike and ratios stay meaningful even when absolute times are noisy.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from .fileio import atomic_path, save_json_atomic
from .meters import peak_memory_mib, synchronize, timed_call
from .pipeline import autocast
from .speedups import InferenceOptions, optimize_pipeline
from .variants import FeatureVariant

logger = logging.getLogger(__name__)


def time_interleaved(
    tasks: dict[str, Callable[[], Any]], device: torch.device, repeats: int = 10, warmup: int = 2
) -> dict[str, list[float]]:
    """Seconds per call of each task: `warmup` untimed calls each, then `repeats` rounds calling every task once.

    Interleaving (A, B, C, A, B, C, ...) spreads background load over all tasks alike, so their ratios are
    robust on a shared machine; take the median of each list.
    """
    with torch.inference_mode():
        for fn in tasks.values():
            for _ in range(warmup):
                fn()
        times: dict[str, list[float]] = {name: [] for name in tasks}
        for _ in range(repeats):
            for name, fn in tasks.items():
                times[name].append(timed_call(fn, device)[1])
    return times


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of `fn` as counted by ``FlopCounterMode`` (matmul, conv, attention; 2 per MAC)."""
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def parameter_count(module: torch.nn.Module | None) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def upsampler_parameter_count(variant: FeatureVariant) -> int:
    """Parameters of the variant's upsampler as trained (before BN folding, which removes some)."""
    pipeline = variant.pipeline
    return getattr(pipeline, "upsampler_parameter_count", parameter_count(pipeline.upsampler))


def is_out_of_memory(exc: BaseException) -> bool:
    """True for CUDA OOM, and for CPU allocation failures (``MemoryError`` or the allocator's RuntimeError)."""
    if isinstance(exc, MemoryError):
        return True
    if hasattr(torch.cuda, "OutOfMemoryError") and isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and (
        "out of memory" in str(exc) or "can't allocate memory" in str(exc)
    )


@dataclass
class Stage:
    """One part of a variant measured alone, batch 1: the backbone, or the upsampler on precomputed features."""

    ms: float
    flops: int
    params: int
    peak_memory_mib: float


@dataclass
class BenchRow:
    """All measurements of one variant at one base size."""

    variant: str
    size: int
    input_size: list[int]
    output_grid: list[int]
    latency_ms: float  # median per image at batch 1, whole pipeline (normalise + backbone + upsampler)
    latency_ms_min: float
    latency_ms_max: float
    throughput: dict[str, float]  # batch size -> images / s
    peak_memory_mib: dict[str, float]  # batch size -> MiB (CUDA: max allocated; CPU: peak live tensors)
    flops: int  # per image
    params: int  # backbone + upsampler
    upsampler_params: int
    method: str | None = None  # the upsampler's registered name; None without one
    checkpoint: str | None = None  # the upsampler's checkpoint folder, if trained
    backbone: Stage | None = None
    upsampler: Stage | None = None
    samples_ms: list[float] = field(default_factory=list)


@dataclass
class BenchSettings:
    sizes: list[int]
    variants: list[str]
    batch_sizes: list[int] = field(default_factory=lambda: [1, 4, 16])
    repeats: int = 10
    warmup: int = 2
    device: str = "cpu"
    options: InferenceOptions = field(default_factory=InferenceOptions)
    seed: int = 0


def random_images(batch: int, size: tuple[int, int], device: torch.device, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, *size, generator=generator).to(device)


def _stage_tasks(variant: FeatureVariant, images: torch.Tensor) -> dict[str, Callable[[], Any]]:
    """Callables for the backbone alone and the upsampler alone (on features computed here, once).

    Each stage runs as inside ``pipeline(images)``: under the pipeline's autocast (``amp``) and, for the
    upsampler, on channels-last inputs when the pipeline uses them; its modules are the pipeline's own
    (BN folded, compiled), so ``upsampler / backbone`` compares like with like.
    """
    pipeline = variant.pipeline
    backbone = pipeline.backbone
    amp = pipeline.amp
    size = pipeline.output_grid(*images.shape[-2:])
    with torch.inference_mode(), autocast(images.device, amp):
        normalized = backbone.normalize(images)
        features = backbone(normalized)
        guide = pipeline.guide(images, size, normalized=normalized)
    if pipeline.channels_last:
        features = features.contiguous(memory_format=torch.channels_last)
        if guide is not None:
            guide = guide.contiguous(memory_format=torch.channels_last)

    def run_backbone():
        with autocast(images.device, amp):
            return backbone(normalized)

    tasks = {"backbone": run_backbone}
    upsampler = pipeline.upsampler
    if upsampler is not None:

        def run_upsampler():
            with autocast(images.device, amp):
                return upsampler(features, guide, size)

        tasks["upsampler"] = run_upsampler
    return tasks


def _stage_key(variant: FeatureVariant, stage: str, base: tuple[int, int]) -> str:
    if stage == "backbone":
        return "backbone@{}x{}".format(*variant.input_size(base))
    return f"{variant.spec}/{stage}"


def optimize_variants(
    variants: list[FeatureVariant], options: InferenceOptions, device: torch.device
) -> None:
    """Apply the speed `options` to each variant's pipeline in place and move it to `device`."""
    for variant in variants:
        variant.pipeline = optimize_pipeline(variant.pipeline, options).to(device).eval()


def bench_size(variants: list[FeatureVariant], size: int, settings: BenchSettings) -> list[BenchRow]:
    """Measure every variant at base size `size` (see the module docstring)."""
    device = torch.device(settings.device)
    base = (size, size)
    rows = []
    for variant in variants:
        variant.pipeline.backbone.grid_size(*variant.input_size(base))  # fail early on a bad size
    # Whole-pipeline timings, interleaved across variants, for every batch size.
    per_batch: dict[int, dict[str, list[float]]] = {}
    memory: dict[int, dict[str, float]] = {}
    for batch in settings.batch_sizes:
        inputs = {v.spec: random_images(batch, v.input_size(base), device, settings.seed) for v in variants}
        tasks = {v.spec: (lambda v=v, x=inputs[v.spec]: v(x)) for v in variants}
        logger.info(
            "size %d, batch %d: timing %d variants x %d repeats", size, batch, len(tasks), settings.repeats
        )
        per_batch[batch] = time_interleaved(tasks, device, settings.repeats, settings.warmup)
        memory[batch] = {name: peak_memory_mib(fn, device) for name, fn in tasks.items()}
        del inputs, tasks
    # Stages alone at batch 1, interleaved too.
    stage_tasks: dict[str, Callable[[], Any]] = {}
    stage_flops: dict[str, int] = {}
    stage_memory: dict[str, float] = {}
    for variant in variants:
        images = random_images(1, variant.input_size(base), device, settings.seed)
        for stage, fn in _stage_tasks(variant, images).items():
            key = _stage_key(variant, stage, base)
            if key in stage_tasks:  # the backbone at one input size is shared by all its variants
                continue
            stage_tasks[key] = fn
            stage_flops[key] = count_flops(fn)
            stage_memory[key] = peak_memory_mib(fn, device)
    stage_times = time_interleaved(stage_tasks, device, settings.repeats, settings.warmup)
    for variant in variants:
        images = random_images(1, variant.input_size(base), device, settings.seed)
        samples = (
            [t * 1000 for t in per_batch[settings.batch_sizes[0]][variant.spec]]
            if settings.batch_sizes[0] == 1
            else []
        )
        if not samples:  # batch 1 not requested: latency from the smallest batch, per image
            first = settings.batch_sizes[0]
            samples = [t * 1000 / first for t in per_batch[first][variant.spec]]
        backbone, upsampler = variant.pipeline.backbone, variant.pipeline.upsampler
        stages = {}
        params = {"backbone": parameter_count(backbone), "upsampler": upsampler_parameter_count(variant)}
        for stage in ("backbone", "upsampler"):
            key = _stage_key(variant, stage, base)
            if key in stage_times:
                stages[stage] = Stage(
                    ms=statistics.median(stage_times[key]) * 1000,
                    flops=stage_flops[key],
                    params=params[stage],
                    peak_memory_mib=stage_memory[key],
                )
        rows.append(
            BenchRow(
                variant=variant.spec,
                size=size,
                input_size=list(variant.input_size(base)),
                output_grid=list(variant.output_grid(base)),
                latency_ms=statistics.median(samples),
                latency_ms_min=min(samples),
                latency_ms_max=max(samples),
                throughput={
                    str(b): b / statistics.median(per_batch[b][variant.spec]) for b in settings.batch_sizes
                },
                peak_memory_mib={str(b): memory[b][variant.spec] for b in settings.batch_sizes},
                flops=count_flops(lambda v=variant, x=images: v(x)),
                params=params["backbone"] + params["upsampler"],
                upsampler_params=params["upsampler"],
                method=upsampler.name if upsampler is not None else None,
                checkpoint=variant.checkpoint,
                backbone=stages.get("backbone"),
                upsampler=stages.get("upsampler"),
                samples_ms=[round(s, 3) for s in samples],
            )
        )
    return rows


def run_benchmark(variants: list[FeatureVariant], settings: BenchSettings) -> list[BenchRow]:
    """Apply the inference options to `variants` and measure them at every size in `settings`."""
    device = torch.device(settings.device)
    optimize_variants(variants, settings.options, device)
    rows = []
    for size in settings.sizes:
        rows.extend(bench_size(variants, size, settings))
    return rows


def find_max_size(
    variant: FeatureVariant, start: int, device: str | torch.device, cap: int, batch: int = 1
) -> tuple[int | None, int | None]:
    """Largest base size ``start * 2**k <= cap`` at which one call of `variant` fits in memory.

    Doubles the size until the call raises out-of-memory (``torch.cuda.OutOfMemoryError`` on CUDA) or the
    next size exceeds `cap`. Returns ``(largest that fits, first that failed or None)``. On CUDA the
    cache is emptied after each try. On CPU the operating system may overcommit and swap rather than
    fail, so there the search is only meaningful as "runs up to `cap`"; keep `cap` small.
    """
    device = torch.device(device)
    largest, failed = None, None
    size = start
    while size <= cap:
        try:
            images = random_images(batch, variant.input_size((size, size)), device)
            with torch.inference_mode():
                variant(images)
            synchronize(device)
            largest = size
            logger.info("%s: %d px fits", variant.spec, size)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            failed = size
            logger.info("%s: %d px is out of memory", variant.spec, size)
            break
        finally:
            images = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
        size *= 2
    return largest, failed


# ---------------------------------------------------------------------------------------------- reports


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else math.nan


def _by_output_grid(size: int, rows) -> list[dict[str, Any]]:
    """Rows of one base `size` grouped by method and checkpoint, each against its group's smallest output grid.

    Groups of one variant are left out. The reference is the first variant of the group with the fewest
    output cells; its own row has ratios 1.
    """
    groups: dict[tuple[str, str | None], list[BenchRow]] = {}
    for row in rows:
        if row.upsampler is not None and row.method is not None:
            groups.setdefault((row.method, row.checkpoint), []).append(row)
    out = []
    for members in groups.values():
        if len(members) < 2:
            continue
        smallest = min(members, key=lambda r: math.prod(r.output_grid))
        for row in sorted(members, key=lambda r: math.prod(r.output_grid)):
            up, ref = row.upsampler, smallest.upsampler
            out.append(
                {
                    "size": size,
                    "variant": row.variant,
                    "output_grid": row.output_grid,
                    "smallest": smallest.variant,
                    "upsampler_ms": up.ms,
                    "time_vs_smallest": _ratio(up.ms, ref.ms),
                    "upsampler_peak_mib": up.peak_memory_mib,
                    "memory_vs_smallest": _ratio(up.peak_memory_mib, ref.peak_memory_mib),
                    "flops_vs_smallest": _ratio(up.flops, ref.flops),
                    "pipeline_ms": row.latency_ms,
                }
            )
    return out


def comparisons(rows: list[BenchRow]) -> dict[str, list[dict[str, Any]]]:
    """Ratios the README quotes, from the rows of one run.

    - ``upsampler_vs_backbone``: upsampler-alone time (and FLOPs) over backbone time at the same input;
    - ``lift_vs_input_2x``: whole-pipeline latency of ``input-2x`` over each one-pass upsampler variant at
      the same base size (the same output grid); > 1 means the upsampler is faster;
    - ``by_output_grid``: upsampler-alone time, FLOPs and memory of the variants of one method and
      checkpoint (e.g. ``lift``, ``lift:iters=2``, ``lift:size=96x96``) relative to the one of them with
      the smallest output grid (`_by_output_grid`).
    """
    out: dict[str, list[dict[str, Any]]] = {
        "upsampler_vs_backbone": [],
        "lift_vs_input_2x": [],
        "by_output_grid": [],
    }
    by_size: dict[int, dict[str, BenchRow]] = {}
    for row in rows:
        by_size.setdefault(row.size, {})[row.variant] = row
    for size, table in by_size.items():
        for row in table.values():
            if row.upsampler is not None and row.backbone is not None:
                out["upsampler_vs_backbone"].append(
                    {
                        "size": size,
                        "variant": row.variant,
                        "upsampler_ms": row.upsampler.ms,
                        "backbone_ms": row.backbone.ms,
                        "time_ratio": _ratio(row.upsampler.ms, row.backbone.ms),
                        "flops_ratio": _ratio(row.upsampler.flops, row.backbone.flops),
                    }
                )
        double = table.get("input-2x")
        if double is not None:
            for row in table.values():
                if row.upsampler is not None and row.output_grid == double.output_grid:
                    out["lift_vs_input_2x"].append(
                        {
                            "size": size,
                            "variant": row.variant,
                            "variant_ms": row.latency_ms,
                            "input_2x_ms": double.latency_ms,
                            "speedup": _ratio(double.latency_ms, row.latency_ms),
                            "flops_ratio": _ratio(double.flops, row.flops),
                            "memory_ratio": _ratio(
                                double.peak_memory_mib.get("1", math.nan),
                                row.peak_memory_mib.get("1", math.nan),
                            ),
                        }
                    )
        out["by_output_grid"].extend(_by_output_grid(size, table.values()))
    return out


def _g(flops: int) -> str:
    return f"{flops / 1e9:.2f}"


def markdown_report(
    rows: list[BenchRow], settings: BenchSettings, env: dict[str, Any], extra: dict[str, Any] | None = None
) -> str:
    """The markdown tables of `write_bench_results`."""
    batch_cols = [f"img/s @{b}" for b in settings.batch_sizes]
    lines = [
        "## featlift bench",
        "",
        f"device `{env['device']}`, {env['threads']} threads, torch {env['torch']}, options `{settings.options.describe()}`, "
        f"median of {settings.repeats} interleaved repeats after {settings.warmup} warm-up calls"
        + (f", load average at the end {env['load_average']}" if "load_average" in env else ""),
        "",
    ]
    header = [
        "size",
        "variant",
        "input",
        "output grid",
        "ms / img",
        "min ms",
        *batch_cols,
        "peak MiB @1",
        "GFLOPs",
        "params M",
        "backbone ms",
        "upsampler ms",
        "upsampler GFLOPs",
        "upsampler / backbone",
    ]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        up = row.upsampler
        cells = [
            str(row.size),
            f"`{row.variant}`",
            "x".join(map(str, row.input_size)),
            "x".join(map(str, row.output_grid)),
            f"{row.latency_ms:.1f}",
            f"{row.latency_ms_min:.1f}",
            *(f"{row.throughput[str(b)]:.2f}" for b in settings.batch_sizes),
            f"{row.peak_memory_mib[str(settings.batch_sizes[0])]:.0f}",
            _g(row.flops),
            f"{row.params / 1e6:.2f}",
            f"{row.backbone.ms:.1f}" if row.backbone else "",
            f"{up.ms:.2f}" if up else "",
            _g(up.flops) if up else "",
            f"{up.ms / row.backbone.ms:.3f}" if up and row.backbone else "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    comp = comparisons(rows)
    if comp["upsampler_vs_backbone"]:
        lines += [
            "",
            "### Upsampler cost as a fraction of the backbone (same input, batch 1)",
            "",
            "| size | variant | upsampler ms | backbone ms | time ratio | FLOPs ratio |",
            "|---|---|---|---|---|---|",
        ]
        for c in comp["upsampler_vs_backbone"]:
            lines.append(
                f"| {c['size']} | `{c['variant']}` | {c['upsampler_ms']:.2f} | {c['backbone_ms']:.1f} | "
                f"{c['time_ratio']:.3f} | {c['flops_ratio']:.3f} |"
            )
    if comp["lift_vs_input_2x"]:
        lines += [
            "",
            "### backbone@S + upsampler against backbone@2S (same output grid, batch 1)",
            "",
            "| S | variant | variant ms | input-2x ms | speedup | FLOPs ratio | memory ratio |",
            "|---|---|---|---|---|---|---|",
        ]
        for c in comp["lift_vs_input_2x"]:
            lines.append(
                f"| {c['size']} | `{c['variant']}` | {c['variant_ms']:.1f} | {c['input_2x_ms']:.1f} | "
                f"{c['speedup']:.2f}x | {c['flops_ratio']:.2f}x | {c['memory_ratio']:.2f}x |"
            )
    if comp["by_output_grid"]:
        lines += [
            "",
            "### Upsampler alone by output grid, against the smallest grid of the same method and checkpoint (batch 1)",
            "",
            "| size | variant | output grid | upsampler ms | time vs smallest | FLOPs vs smallest | peak MiB | "
            "memory vs smallest | pipeline ms |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for c in comp["by_output_grid"]:
            grid = "x".join(map(str, c["output_grid"]))
            lines.append(
                f"| {c['size']} | `{c['variant']}` | {grid} | {c['upsampler_ms']:.2f} | {c['time_vs_smallest']:.2f}x | "
                f"{c['flops_vs_smallest']:.2f}x | {c['upsampler_peak_mib']:.0f} | {c['memory_vs_smallest']:.2f}x | "
                f"{c['pipeline_ms']:.1f} |"
            )
    if extra and extra.get("max_size"):
        lines += [
            "",
            f"### Largest input that fits ({extra.get('max_size_note', '')})",
            "",
            "| variant | largest base size | first failing size |",
            "|---|---|---|",
        ]
        for item in extra["max_size"]:
            lines.append(f"| `{item['variant']}` | {item['largest']} | {item['failed'] or '-'} |")
    if extra and extra.get("process_rss"):
        lines += [
            "",
            f"### Peak RSS of a fresh process (batch {extra['process_rss'][0]['batch']})",
            "",
            "| size | variant | peak while loading MiB | before the call MiB | peak during the call MiB | the call adds MiB |",
            "|---|---|---|---|---|---|",
        ]
        for item in extra["process_rss"]:
            lines.append(
                f"| {item['size']} | `{item['variant']}` | {item['load_peak_mib']:.0f} | {item['before_call_mib']:.0f} | "
                f"{item['call_peak_mib']:.0f} | {item['call_adds_mib']:.0f} |"
            )
    lines += [
        "",
        "Peak memory: max allocated on CUDA; on CPU the peak of live tensor storages during one call (a dispatch-mode tracker), inputs and weights excluded. FLOPs: "
        "torch FlopCounterMode (matmul, conv, attention), per image.",
    ]
    return "\n".join(lines) + "\n"


def write_bench_results(
    out_dir: str | os.PathLike,
    rows: list[BenchRow],
    settings: BenchSettings,
    env: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``bench.json`` (rows, comparisons, settings, environment) and ``bench.md`` into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "settings": {**asdict(settings), "options": settings.options.to_dict()},
        "environment": env,
        "results": [asdict(row) for row in rows],
        "comparisons": comparisons(rows),
        **(extra or {}),
    }
    save_json_atomic(payload, out_dir / "bench.json")
    with atomic_path(out_dir / "bench.md") as tmp:
        tmp.write_text(markdown_report(rows, settings, env, extra))
    return out_dir
