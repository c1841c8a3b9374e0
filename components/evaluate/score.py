"""Scoring generated rows: which metric family a task has, the reference in that family's form, per-sample
fields, per-task metrics and counts.

Task -> metric family (``TASK_FAMILY``): ``items`` -> item-set IoU/F1; ``description``, ``caption``,
``chat`` -> SacreBLEU/ROUGE-L; ``numeric`` -> pMAE per field and averaged; ``pope``/``yes_no`` ->
accuracy, precision, recall, F1; ``seed`` -> accuracy; ``mmbench``/``multiple_choice`` -> circular
accuracy. Task names components/evaluate/metrics.py knows (ingredients, recipe, nutrition, ...) keep
their own family; any other task is scored as free text against its reference answer. Metrics are
named ``{task}/{metric}`` (``items/iou``, ``description/rouge_l``, ``numeric/pmae``,
``numeric/pmae_area``) plus ``score`` = ``metrics.primary_score`` over them.

Rows that cannot be scored (a reference the metrics cannot read) are skipped and counted by reason
(``counts["skipped/<reason>"]``). Predictions are never skipped: an unparseable answer scores as wrong
and is counted (``counts["<task>/unparseable"]``).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from components.evaluate import metrics as task_metrics

TASK_FAMILY = {
    "items": "set", "description": "text", "caption": "text", "chat": "text", "numeric": "numeric",
    "pope": "pope", "yes_no": "pope", "seed": "seed", "mmbench": "mmbench", "multiple_choice": "mmbench",
}


# Per-family entries of components.evaluate.metrics that are counts, not quality metrics.
_COUNT_NAMES = ("n", "unparseable", "missing_fields")


# Columns that travel from the prompt step through generation to the driver.
TEXT_COLUMNS = ("key", "id", "task", "question", "prompt", "reference", "answer_fields", "image_digest", "skip",
                "skip_detail")


TABLE_COLUMNS = (
    "key", "id", "task", "family", "question", "prompt", "prediction", "reference", "parsed", "correct",
    "score", "sample_metrics", "image_digest", "skipped", "skip_detail",
)


def task_family(task: str) -> str:
    """The components.evaluate.metrics family that scores a task (free text for tasks it does not know)."""
    if task in TASK_FAMILY:
        return TASK_FAMILY[task]
    return task if task in task_metrics.TASK_FAMILIES else "text"


def reference_for(family: str, answer_fields: Mapping[str, Any], answer: str) -> Any:
    """The ground truth in the form the family's metric takes: structured fields first, else the answer text."""
    if family == "set":
        items = answer_fields.get("items")
        return items if isinstance(items, list) and items else answer
    if family == "numeric":
        values = {k: v for k, v in answer_fields.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        return values or answer
    if family in ("pope", "seed"):
        return str(answer_fields.get("answer") or answer)
    if family == "mmbench":
        return dict(answer_fields)
    return str(answer_fields.get("reference") or answer_fields.get("caption") or answer)


@dataclass
class EvalResult:
    """Metrics (``{task}/{metric}`` and ``score``), one table row per sample, and counts."""

    metrics: dict[str, float]
    per_sample: pd.DataFrame
    counts: dict[str, int] = field(default_factory=dict)


def _score_one(family: str, prediction: str, reference: Any) -> dict[str, float]:
    return task_metrics.score_task_family(family, [prediction], [reference])


def score_rows(rows: pd.DataFrame) -> EvalResult:
    """Score generated rows (columns TEXT_COLUMNS + prediction): per-sample fields, per-task metrics, counts."""
    missing = [c for c in (*TEXT_COLUMNS, "prediction") if c not in rows.columns]
    if missing:
        raise ValueError(f"rows to score lack the columns {missing}; they come from generation_dataset")
    table = rows.sort_values("key", kind="stable").reset_index(drop=True).copy()
    table["family"] = [task_family(t) if not s else "" for t, s in zip(table["task"], table["skip"])]
    references: list[Any] = [None] * len(table)
    parsed: list[bool | None] = [None] * len(table)
    scores: list[float] = [math.nan] * len(table)
    details: list[str] = [""] * len(table)
    skipped = list(table["skip"])
    for i, row in enumerate(table.itertuples(index=False)):
        if skipped[i]:
            continue
        fields = json.loads(row.answer_fields or "{}")
        references[i] = reference_for(row.family, fields, row.reference)
        try:
            sample = _score_one(row.family, row.prediction, references[i])
        except ValueError as exc:  # predictions never raise: the reference is unreadable
            skipped[i] = "bad_reference"
            table.at[i, "skip_detail"] = str(exc)
            continue
        parsed[i] = sample.get("unparseable", 0.0) == 0
        scores[i] = task_metrics.primary_score(sample)
        details[i] = json.dumps({k: round(v, 4) for k, v in sample.items() if k not in _COUNT_NAMES})
    table["skipped"] = skipped
    table["parsed"] = parsed
    table["score"] = scores
    table["correct"] = [None if math.isnan(s) else bool(s >= 100.0 - 1e-9) for s in scores]
    table["sample_metrics"] = details

    metrics: dict[str, float] = {}
    counts: Counter[str] = Counter(samples=len(table))
    for reason in skipped:
        if reason:
            counts["skipped"] += 1
            counts[f"skipped/{reason}"] += 1
    kept = [i for i in range(len(table)) if not skipped[i]]
    counts["evaluated"] = len(kept)
    for task in sorted({table.at[i, "task"] for i in kept}):
        index = [i for i in kept if table.at[i, "task"] == task]
        family = table.at[index[0], "family"]
        result = task_metrics.score_task_family(
            family, [table.at[i, "prediction"] for i in index], [references[i] for i in index]
        )
        for name, value in result.items():
            if name in _COUNT_NAMES:
                counts[f"{task}/{name}"] = int(value)
            else:
                metrics[f"{task}/{name}"] = float(value)
        counts["unparseable"] += int(result.get("unparseable", 0))
    if not metrics:
        raise RuntimeError(f"no sample could be evaluated: {dict(counts)} (see the per-sample skip reasons)")
    metrics["score"] = task_metrics.primary_score(metrics)
    return EvalResult(metrics=metrics, per_sample=table[list(TABLE_COLUMNS)], counts=dict(counts))
