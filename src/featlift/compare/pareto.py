"""The quality-vs-cost Pareto front of a task's methods, and the plot of every task's front (matplotlib, PNG)."""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from ..fileio import atomic_path


def pareto_front(points: Sequence[tuple[str, float, float]]) -> list[str]:
    """The labels of the points ``(label, cost, quality)`` that no other point dominates (at most the cost and at
    least the quality, better in one), in order of cost. Points with a non-finite value are left out."""
    finite = [(label, c, q) for label, c, q in points if math.isfinite(c) and math.isfinite(q)]
    front = []
    for label, cost, quality in finite:
        dominated = any(
            c <= cost and q >= quality and (c < cost or q > quality)
            for other, c, q in finite
            if other != label
        )
        if not dominated:
            front.append((cost, -quality, label))
    return [label for _, _, label in sorted(front)]


def _drawn_digest(path: Path) -> str | None:
    """The digest of the panels a PNG written by `plot_fronts` shows (in its text chunk), None if unreadable."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return getattr(image, "text", {}).get(DIGEST_KEY)
    except OSError:
        return None


DIGEST_KEY = "featlift-panels"
PLOT_REVISION = 2  # in the digest: bumped when the drawing changes, so older PNGs are redrawn


def plot_labels(specs: Sequence[str]) -> dict[str, str]:
    """Short labels for the plot: each spec without its checkpoint path (``jafar:DIR:size=64x64`` ->
    ``jafar:size=64x64``), unless two specs would then share a label, which keep their full spec."""
    short = {}
    for spec in specs:
        name, *parts = spec.split(":")
        short[spec] = ":".join([name, *(part for part in parts if "=" in part)])
    counts = Counter(short.values())
    return {spec: label if counts[label] == 1 else spec for spec, label in short.items()}


def plot_fronts(
    panels: Sequence[tuple[str, str, list[tuple[str, float, float]]]], path: str | os.PathLike
) -> Path | None:
    """One panel per ``(task, metric, points)``: each method at (ms per image, quality), the Pareto front
    joined and its points filled; written atomically to `path` (PNG). None when there is nothing to plot.
    A PNG already at `path` that shows the same panels (a digest in its metadata) is kept as it is."""
    panels = [p for p in panels if any(math.isfinite(c) and math.isfinite(q) for _, c, q in p[2])]
    if not panels:
        return None
    path = Path(path)
    digest = hashlib.sha256(json.dumps([PLOT_REVISION, panels], default=str).encode()).hexdigest()[:16]
    if path.is_file() and _drawn_digest(path) == digest:
        return path
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib import pyplot as plt
    from matplotlib import ticker

    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2), squeeze=False)
    for axis, (task, metric, points) in zip(axes[0], panels, strict=True):
        front = pareto_front(points)
        by_label = {label: (c, q) for label, c, q in points if math.isfinite(c) and math.isfinite(q)}
        labels = plot_labels(list(by_label))
        for label, (cost, quality) in by_label.items():
            on_front = label in front
            axis.scatter(
                cost,
                quality,
                s=40,
                color="tab:red" if on_front else "white",
                edgecolors="tab:red" if on_front else "grey",
            )
            axis.annotate(
                labels[label], (cost, quality), textcoords="offset points", xytext=(4, 4), fontsize=7
            )
        axis.plot([by_label[m][0] for m in front], [by_label[m][1] for m in front], color="tab:red", lw=1)
        logarithmic = all(cost > 0 for cost, _ in by_label.values())
        if logarithmic:
            axis.set_xscale("log")
            axis.xaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
            axis.xaxis.set_minor_formatter(ticker.NullFormatter())
        axis.set_xlabel("ms per image" + (" (log)" if logarithmic else ""))
        axis.set_ylabel(metric)
        axis.set_title(f"{task} (red: Pareto front)")
        axis.grid(alpha=0.3)
        axis.margins(x=0.15, y=0.1)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110, metadata={DIGEST_KEY: digest})
    plt.close(figure)
    return path
