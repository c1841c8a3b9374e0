"""Figure 5 of the paper: a metric against trainable adapter size, one line per adapter method with one
point per rank, error bars the standard deviation over seeds. Drawn on matplotlib's Agg canvas (no
display, no pyplot state), so it runs on a headless worker."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from components.study.results import Trial, lower_is_better, trials_by_variant

# Spread of adapter sizes beyond which the x axis goes logarithmic, so small ranks stay readable.
LOG_X_SPAN = 4.0


@dataclass(frozen=True)
class FigurePoint:
    """One variant on the figure: its method's line, rank, size and the metric over its seeds."""

    method: str
    rank: int | None
    variant: str
    adapter_mib: float
    mean: float
    std: float


def figure_points(trials: Sequence[Trial], metric: str) -> dict[str, list[FigurePoint]]:
    """Points per method (a variant without `method` is its own line), sorted by adapter MiB.

    Refuses two variants of one method at the same rank: they would be one point twice.
    """
    lines: dict[str, list[FigurePoint]] = {}
    for variant, by_seed in trials_by_variant(trials).items():
        first = next(iter(by_seed.values()))
        values = [trial.metrics[metric] for trial in by_seed.values() if metric in trial.metrics]
        if not values:
            continue
        method = first.method or variant
        points = lines.setdefault(method, [])
        if first.rank is not None and any(p.rank == first.rank for p in points):
            other = next(p.variant for p in points if p.rank == first.rank)
            raise ValueError(f"method {method!r} has two variants at rank {first.rank} ({other}, {variant}); "
                             "give them different method names to draw them as separate lines")
        std = float(np.std(values, ddof=1)) if len(values) > 1 else math.nan
        points.append(FigurePoint(method, first.rank, variant,
                                  float(np.mean([t.adapter_mib for t in by_seed.values()])),
                                  float(np.mean(values)), std))
    if not lines:
        raise ValueError(f"no trial has the metric {metric!r}")
    return {method: sorted(points, key=lambda p: p.adapter_mib) for method, points in lines.items()}


def draw_figure_5(trials: Sequence[Trial], metric: str = "score") -> Figure:
    """The figure itself, for callers (and tests) that want the Axes before it is written."""
    lines = figure_points(trials, metric)
    fig = Figure(figsize=(6.5, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for method, points in lines.items():
        errors = [0.0 if math.isnan(p.std) else p.std for p in points]
        ax.errorbar([p.adapter_mib for p in points], [p.mean for p in points], yerr=errors,
                    marker="o", capsize=3, label=method)
        for point in points:
            if point.rank is not None:
                ax.annotate(f"r{point.rank}", (point.adapter_mib, point.mean), textcoords="offset points",
                            xytext=(4, 4), fontsize=7)
    sizes = [p.adapter_mib for points in lines.values() for p in points]
    if min(sizes) > 0 and max(sizes) / min(sizes) > LOG_X_SPAN:
        ax.set_xscale("log")
    ax.set_xlabel("trainable adapter size (MiB)")
    ax.set_ylabel(f"{metric} (lower is better)" if lower_is_better(metric) else metric)
    ax.set_title(f"{metric} against adapter size (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(title="method")
    fig.tight_layout()
    return fig


def figure_5(trials: Sequence[Trial], path: str | Path, metric: str = "score") -> Path:
    """Write Figure 5 as a PNG and return its path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    draw_figure_5(trials, metric).savefig(target, format="png")
    return target
