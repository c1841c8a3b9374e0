"""Evaluation results as a person reads them: metrics side by side with difference columns, and the
per-sample table as CSV, JSON or JSON Lines."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from components.config import ConfigError
from components.evaluate.score import EvalResult


def _format(value: float | int | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


# The difference columns of a zero-shot / fine-tuned / blind comparison: (column, minuend, subtrahend).
DIFFERENCES = (("change", "fine-tuned", "zero-shot"), ("from vision", "fine-tuned", "blind"))


def comparison_table(
    results: Mapping[str, EvalResult], differences: Sequence[tuple[str, str, str]] | None = None
) -> str:
    """Metrics and counts of several evaluations side by side, plus difference columns.

    `differences` lists (column, minuend, subtrahend) by result name, e.g. ("from vision",
    "fine-tuned", "blind"); with two results and none given, "change" is the second minus the first.
    """
    if not results:
        raise ValueError("comparison_table needs at least one result")
    names = list(results)
    if differences is None:
        differences = [("change", names[1], names[0])] if len(names) == 2 else []
    differences = [d for d in differences if d[1] in results and d[2] in results]
    metric_names = sorted({k for r in results.values() for k in r.metrics if k != "score"}) + ["score"]
    count_names = ["samples", "evaluated", "skipped", "unparseable"]
    header = ["metric", *names, *(label for label, _, _ in differences)]
    lines: list[list[str]] = []
    for name in metric_names:
        values = {n: results[n].metrics.get(name) for n in names}
        label = name + (" (lower is better)" if name.rsplit("/", 1)[-1].startswith("pmae") else "")
        deltas = [f"{values[a] - values[b]:+.2f}" if values[a] is not None and values[b] is not None else "-"
                  for _, a, b in differences]
        lines.append([label, *(_format(values[n]) for n in names), *deltas])
    for name in count_names:
        lines.append([name, *(_format(results[n].counts.get(name, 0)) for n in names), *([""] * len(differences))])
    widths = [max(len(row[c]) for row in [header, *lines]) for c in range(len(header))]

    def fmt(row: list[str]) -> str:
        return "  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(row, widths)))

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(header), rule, *(fmt(r) for r in lines[: len(metric_names)]), rule,
                      *(fmt(r) for r in lines[len(metric_names):])])


TABLE_SUFFIXES = (".csv", ".json", ".jsonl")


def check_table_path(path: str | Path) -> Path:
    """A per-sample table file name with a supported suffix (checked before any work is done)."""
    target = Path(path)
    if target.suffix.lower() not in TABLE_SUFFIXES:
        raise ConfigError(f"--output {str(target)!r}: use a file name ending in {', '.join(TABLE_SUFFIXES)}")
    return target


def write_table(table: pd.DataFrame, path: str | Path) -> str:
    """Write a per-sample table as CSV (.csv), a JSON list (.json) or JSON Lines (.jsonl)."""
    target = check_table_path(path)
    suffix = target.suffix.lower()
    target.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".csv":
        table.to_csv(target, index=False)
    elif suffix == ".json":
        target.write_text(table.to_json(orient="records", indent=1, force_ascii=False))
    elif suffix == ".jsonl":
        table.to_json(target, orient="records", lines=True, force_ascii=False)
    return str(target)
