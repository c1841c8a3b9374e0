"""Loss and learning-rate plots (PNG) and the metric table (JSON, CSV) of a training history.

Each history row is one logged step; ``step`` is its x value (the row index when absent);
columns with "loss" in the name go on the loss plot, ``lr``/``lr_*``/``*learning_rate*``
columns on the learning-rate plot.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from components.tracking.redact import redact


def write_curves(history: Sequence[Mapping[str, Any]], folder: Path) -> list[str]:
    """Write loss.png, learning_rate.png (when there is something to draw), history.json and history.csv."""
    rows = [dict(r) for r in history]
    steps = [r.get("step", i) for i, r in enumerate(rows)]
    columns = list(dict.fromkeys(k for r in rows for k in r))
    loss_cols = [c for c in columns if "loss" in c.lower()]
    lr_cols = [c for c in columns if c.lower() == "lr" or c.lower().startswith("lr_") or "learning_rate" in c.lower()]
    written = []
    for file, cols, label, log_scale in [
        ("loss.png", loss_cols, "loss", False), ("learning_rate.png", lr_cols, "learning rate", True),
    ]:
        if cols and _plot(folder / file, steps, rows, cols, label, log_scale):
            written.append(file)
    (folder / "history.json").write_text(redact(json.dumps(rows, indent=1, default=str)))
    (folder / "history.csv").write_text(redact(_csv(rows, columns)))
    return [*written, "history.json", "history.csv"]


def _plot(path: Path, steps: list[Any], rows: list[dict[str, Any]], cols: list[str], label: str, log: bool) -> bool:
    """Draw one figure with a line per column; False when no column has a numeric value."""
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    drawn = False
    for col in cols:
        points = [(s, r[col]) for s, r in zip(steps, rows) if isinstance(r.get(col), int | float)]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, label=col)
            drawn = True
    if not drawn:
        return False
    if log and all(y > 0 for c in cols for r in rows if isinstance(y := r.get(c), int | float)):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return True


def _csv(rows: list[dict[str, Any]], columns: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()
