"""Results of an evaluation: one row per feature variant, written as results.json and results.md."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..environment import environment
from ..fileio import atomic_path, save_json_atomic


@dataclass
class VariantResult:
    """Quality metrics of one variant with its cost: ms per image and peak memory in MiB."""

    variant: str
    metrics: dict[str, float]
    ms_per_image: float
    peak_memory_mib: float
    details: dict[str, Any] = field(default_factory=dict)  # e.g. per-sequence or per-category tables


@dataclass
class TaskResults:
    """What an evaluation task returns: its rows, the settings of results.json and how to tabulate them.

    ``task`` is the title of results.md and the ``task`` of results.json (e.g. ``"probe (camvid)"``);
    ``metric_names`` are the columns of the table; ``extra_markdown`` follows the table (e.g. per sequence).
    """

    task: str
    rows: list[VariantResult]
    settings: dict[str, Any]
    metric_names: list[str]
    extra_markdown: str = ""

    def table(self) -> str:
        return markdown_table(self.rows, self.metric_names)


def markdown_table(rows: list[VariantResult], metric_names: list[str] | None = None, digits: int = 1) -> str:
    metric_names = metric_names or list(rows[0].metrics) if rows else []
    header = ["variant", *metric_names, "ms / image", "peak MiB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        cells = [
            f"`{row.variant}`",
            *(f"{row.metrics.get(m, float('nan')):.{digits}f}" for m in metric_names),
        ]
        cells += [f"{row.ms_per_image:.1f}", f"{row.peak_memory_mib:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(out_dir: str | os.PathLike, results: TaskResults) -> Path:
    """Write ``results.json`` (everything) and ``results.md`` (the table) into `out_dir`, atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "task": results.task,
        "settings": results.settings,
        "environment": environment(results.settings.get("device")),
        "results": [asdict(row) for row in results.rows],
    }
    save_json_atomic(payload, out_dir / "results.json")
    text = f"## {results.task}\n\n{results.table()}\n"
    if results.extra_markdown:
        text += f"\n{results.extra_markdown}\n"
    with atomic_path(out_dir / "results.md") as tmp:
        tmp.write_text(text)
    return out_dir
