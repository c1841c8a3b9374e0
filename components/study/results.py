"""Summarising the trials of a method study: one row per variant with, for every metric, the mean over
seeds, the sample standard deviation, a t-distribution confidence interval of the mean, the relative
change against the reference variant, and a comparison with the reference paired by seed (wins, paired
t-test, Wilcoxon signed-rank test); written as a paper-style Markdown table or a plain CSV.

Direction: a metric whose last path part contains "pmae" (``numeric/pmae``, ``numeric/pmae_area``) is
lower-is-better, every other metric higher-is-better. Relative changes and wins are stated so that
positive / a win always means better.
"""

from __future__ import annotations

import csv
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import stats

# Markers in a metric's last path part that make it lower-is-better (pMAE is a percentage error).
LOWER_IS_BETTER_MARKERS = ("pmae",)
NOT_AVAILABLE = "n/a"


def lower_is_better(metric: str) -> bool:
    """Whether a smaller value of `metric` is the better one."""
    last_part = metric.rsplit("/", 1)[-1]
    return any(marker in last_part for marker in LOWER_IS_BETTER_MARKERS)


@dataclass(frozen=True)
class Trial:
    """One finished trial: a variant trained with one seed and evaluated on the study's held-out split."""

    variant: str
    seed: int
    metrics: dict[str, float]
    adapter_mib: float
    method: str | None = None
    rank: int | None = None


@dataclass(frozen=True)
class MetricSummary:
    """One metric of one variant over its seeds; `relative_change` is in percent, positive = better."""

    n: int
    mean: float
    std: float
    ci_low: float
    ci_high: float
    relative_change: float


@dataclass(frozen=True)
class Comparison:
    """One metric of a variant against the reference over the seeds both have (pairing is by seed)."""

    n_paired: int
    wins: int
    p_ttest: float
    p_wilcoxon: float


@dataclass(frozen=True)
class VariantRow:
    """One variant; `comparisons` is empty for the reference row."""

    variant: str
    seeds: tuple[int, ...]
    adapter_mib: float
    metrics: dict[str, MetricSummary]
    comparisons: dict[str, Comparison]
    is_reference: bool
    compared_with: str = ""  # the variant its change and paired tests are against (itself for a reference row)


@dataclass(frozen=True)
class StudyTable:
    """The summarised study: rows in display order, metrics in column order (score first)."""

    reference: str
    rows: tuple[VariantRow, ...]
    metric_names: tuple[str, ...]
    confidence: float

    def row(self, variant: str) -> VariantRow:
        for row in self.rows:
            if row.variant == variant:
                return row
        raise KeyError(f"no variant {variant!r} in the study table; variants: {', '.join(self.variants)}")

    @property
    def variants(self) -> tuple[str, ...]:
        return tuple(row.variant for row in self.rows)


def trials_by_variant(trials: Sequence[Trial]) -> dict[str, dict[int, Trial]]:
    """Trials grouped by variant (first-appearance order), then by seed; refuses a seed seen twice."""
    if not trials:
        raise ValueError("a study needs at least one trial; got none")
    grouped: dict[str, dict[int, Trial]] = {}
    for trial in trials:
        by_seed = grouped.setdefault(trial.variant, {})
        if trial.seed in by_seed:
            raise ValueError(f"variant {trial.variant!r} has seed {trial.seed} twice; each seed must be one trial")
        by_seed[trial.seed] = trial
    return grouped


def summarise(
    trials: Sequence[Trial], reference: str, order: Sequence[str] | None = None, confidence: float = 0.95,
    compare_with: Mapping[str, str] | None = None,
) -> StudyTable:
    """The study table: per variant and metric the spread over seeds and the comparison with `reference`.

    `order` is the display order of the variants; variants it leaves out follow in first-appearance
    order. Without it the reference comes first. `compare_with` gives a variant another reference
    (Dual-LoRA r against LoRA at the same rank r); a variant mapped to itself is a reference row.
    """
    grouped = trials_by_variant(trials)
    if reference not in grouped:
        raise ValueError(f"reference variant {reference!r} has no trials; variants: {', '.join(grouped)}")
    pairs = dict(compare_with or {})
    unknown = sorted({v for pair in pairs.items() for v in pair if v not in grouped})
    if unknown:
        raise ValueError(f"compare_with names variants with no trials: {', '.join(unknown)}; variants: "
                         f"{', '.join(grouped)}")
    variants = _display_order(list(grouped), reference, order)
    metric_names = _metric_order({name for trial in trials for name in trial.metrics})
    means = {variant: {m: _describe(_values(by_seed.values(), m), confidence)[0] for m in metric_names}
             for variant, by_seed in grouped.items()}

    rows = []
    for variant in variants:
        by_seed = grouped[variant]
        against = variant if variant == reference else pairs.get(variant, reference)
        summaries: dict[str, MetricSummary] = {}
        comparisons: dict[str, Comparison] = {}
        for metric in metric_names:
            values = _values(by_seed.values(), metric)
            if not values:
                continue
            mean, std, ci_low, ci_high = _describe(values, confidence)
            change = _relative_change(mean, means[against][metric], lower_is_better(metric))
            summaries[metric] = MetricSummary(len(values), mean, std, ci_low, ci_high, change)
            if against != variant:
                comparisons[metric] = _compare(by_seed, grouped[against], metric)
        rows.append(VariantRow(
            variant=variant,
            seeds=tuple(sorted(by_seed)),
            adapter_mib=float(np.mean([trial.adapter_mib for trial in by_seed.values()])),
            metrics=summaries,
            comparisons=comparisons,
            is_reference=against == variant,
            compared_with=against,
        ))
    return StudyTable(reference, tuple(rows), tuple(metric_names), confidence)


def _display_order(variants: list[str], reference: str, order: Sequence[str] | None) -> list[str]:
    if order is None:
        return [reference, *(v for v in variants if v != reference)]
    unknown = [v for v in order if v not in variants]
    if unknown:
        raise ValueError(f"order names variants with no trials: {', '.join(unknown)}; variants: {', '.join(variants)}")
    if len(set(order)) != len(order):
        raise ValueError(f"order names a variant more than once: {', '.join(order)}")
    return [*order, *(v for v in variants if v not in order)]


def _metric_order(names: set[str]) -> list[str]:
    """`score` (the primary metric) first, the task metrics after it alphabetically."""
    return sorted(names, key=lambda name: (name != "score", name))


def _values(trials: Iterable[Trial], metric: str) -> list[float]:
    return [float(trial.metrics[metric]) for trial in trials if metric in trial.metrics]


def _describe(values: Sequence[float], confidence: float) -> tuple[float, float, float, float]:
    """Mean, sample standard deviation (ddof=1) and the t confidence interval of the mean; NaN if undefined."""
    n = len(values)
    mean = float(np.mean(values)) if n else math.nan
    if n < 2:
        return mean, math.nan, math.nan, math.nan
    std = float(np.std(values, ddof=1))
    half_width = float(stats.t.ppf(0.5 + confidence / 2, df=n - 1)) * std / math.sqrt(n)
    return mean, std, mean - half_width, mean + half_width


def _relative_change(mean: float, reference_mean: float, lower_better: bool) -> float:
    """Percent change of the mean against the reference mean, positive = better; NaN when the reference is 0."""
    if reference_mean == 0 or math.isnan(reference_mean):
        return math.nan
    change = 100 * (mean - reference_mean) / abs(reference_mean)
    return -change if lower_better else change


def _compare(by_seed: Mapping[int, Trial], reference: Mapping[int, Trial], metric: str) -> Comparison:
    """Wins and two-sided paired tests over the seeds both variants have a value of `metric` for."""
    seeds = sorted(s for s in by_seed if s in reference and metric in by_seed[s].metrics
                   and metric in reference[s].metrics)
    values = np.array([by_seed[s].metrics[metric] for s in seeds], dtype=float)
    reference_values = np.array([reference[s].metrics[metric] for s in seeds], dtype=float)
    direction = -1.0 if lower_is_better(metric) else 1.0
    wins = int(np.sum(direction * (values - reference_values) > 0))
    if len(seeds) < 2 or np.all(values == reference_values):
        return Comparison(len(seeds), wins, math.nan, math.nan)
    with warnings.catch_warnings():
        # Identical or near-identical differences make scipy warn about precision; the p-value stands.
        warnings.simplefilter("ignore", RuntimeWarning)
        p_ttest = float(stats.ttest_rel(values, reference_values).pvalue)
        p_wilcoxon = float(stats.wilcoxon(values, reference_values).pvalue)
    return Comparison(len(seeds), wins, p_ttest, p_wilcoxon)


def _number(value: float, digits: int = 2) -> str:
    return NOT_AVAILABLE if math.isnan(value) else f"{value:.{digits}f}"


def _p_value(value: float) -> str:
    if math.isnan(value):
        return f"={NOT_AVAILABLE}"
    return "<0.001" if value < 0.001 else f"={value:.2g}"


def _metric_label(metric: str) -> str:
    return f"{metric} (lower is better)" if lower_is_better(metric) else metric


def to_markdown(table: StudyTable, metrics: Sequence[str] | None = None, primary: str = "score") -> str:
    """A paper-style Markdown table: `mean ± std [CI]` and the relative change per metric, the adapter size,
    and the paired comparison with the reference on `primary`; a caption says what the numbers mean.
    Undefined statistics read "n/a"; a metric a variant was not scored on reads "–"."""
    shown = list(table.metric_names if metrics is None else metrics)
    unknown = [m for m in [*shown, primary] if m not in table.metric_names]
    if unknown:
        raise ValueError(f"metrics not in the study: {', '.join(unknown)}; metrics: {', '.join(table.metric_names)}")
    header = ["variant", "adapter MiB"]
    for metric in shown:
        header += [_metric_label(metric), f"Δ {metric}"]
    several = any(row.compared_with not in (row.variant, table.reference) for row in table.rows)
    header.append(f"vs reference ({primary})" if several else f"vs {table.reference} ({primary})")

    lines = []
    for row in table.rows:
        cells = [f"**{row.variant}** (ref)" if row.is_reference else row.variant, f"{row.adapter_mib:.2f}"]
        for metric in shown:
            summary = row.metrics.get(metric)
            if summary is None:
                cells += ["–", "–"]
                continue
            cells.append(f"{_number(summary.mean)} ± {_number(summary.std)} "
                         f"[{_number(summary.ci_low)}, {_number(summary.ci_high)}]")
            cells.append("ref" if row.is_reference else _change(summary.relative_change))
        named = f"vs {row.compared_with}: " if several else ""
        cells.append("ref" if row.is_reference else named + _comparison(row.comparisons.get(primary)))
        lines.append(cells)

    def markdown_row(cells: list[str]) -> str:
        return "| " + " | ".join(cells) + " |"

    return "\n".join([
        markdown_row(header),
        "|" + "|".join([":---", *["---:"] * (len(header) - 1)]) + "|",
        *(markdown_row(cells) for cells in lines),
        "",
        _caption(table, shown, primary, several),
    ])


def _change(value: float) -> str:
    return NOT_AVAILABLE if math.isnan(value) else f"{value:+.1f} %"


def _comparison(comparison: Comparison | None) -> str:
    if comparison is None or comparison.n_paired == 0:
        return "no paired seeds"
    return (f"wins {comparison.wins}/{comparison.n_paired}, p{_p_value(comparison.p_ttest)} (t), "
            f"p{_p_value(comparison.p_wilcoxon)} (Wilcoxon)")


def _caption(table: StudyTable, shown: Sequence[str], primary: str, several: bool = False) -> str:
    seed_counts = sorted({len(row.seeds) for row in table.rows})
    seeds = f"{seed_counts[0]}" if len(seed_counts) == 1 else f"{seed_counts[0]}–{seed_counts[-1]}"
    lower = [m for m in shown if lower_is_better(m)]
    flipped = f" (sign flipped for the lower-is-better {', '.join(lower)})" if lower else ""
    return (
        f"*{seeds} seeds per variant. Cells: mean ± sample standard deviation over seeds "
        f"[{table.confidence * 100:g} % confidence interval of the mean, t distribution with n−1 degrees of freedom]. "
        f"Δ: relative change of the mean against the reference {table.reference}"
        f"{' (or the one its vs cell names)' if several else ''}, positive = better{flipped}. "
        f"vs: on {primary}, seeds the variant beat the reference on out of the seeds both have "
        f"(paired by seed), and two-sided p-values of the paired t-test (t) and the Wilcoxon signed-rank "
        f"test; n/a where undefined (one seed, fewer than two paired seeds, or identical results).*"
    )


COMPARISON_STATISTICS = ("n_paired", "wins", "p_ttest", "p_wilcoxon")
SUMMARY_STATISTICS = ("n", "mean", "std", "ci_low", "ci_high", "relative_change")


def csv_columns(table: StudyTable) -> list[str]:
    """The CSV header: variant facts, then `<metric>:<statistic>` for every metric and statistic."""
    return ["variant", "is_reference", "compared_with", "seeds", "adapter_mib", *(
        f"{metric}:{statistic}" for metric in table.metric_names
        for statistic in (*SUMMARY_STATISTICS, *COMPARISON_STATISTICS)
    )]


def to_csv(table: StudyTable, path: str | Path) -> Path:
    """One row per variant with plain numbers (NaN as ``nan``); comparison cells are empty for the
    reference and for metrics a variant lacks. Relative change is in percent, positive = better."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=csv_columns(table))
        writer.writeheader()
        for row in table.rows:
            record: dict[str, object] = {
                "variant": row.variant, "is_reference": int(row.is_reference), "compared_with": row.compared_with,
                "seeds": len(row.seeds), "adapter_mib": repr(row.adapter_mib),
            }
            for metric, summary in row.metrics.items():
                for statistic in SUMMARY_STATISTICS:
                    record[f"{metric}:{statistic}"] = _plain(getattr(summary, statistic))
            for metric, comparison in row.comparisons.items():
                for statistic in COMPARISON_STATISTICS:
                    record[f"{metric}:{statistic}"] = _plain(getattr(comparison, statistic))
            writer.writerow(record)
    return target


def _plain(value: float | int) -> str:
    """Full precision, so a reader gets the number back exactly."""
    return str(value) if isinstance(value, int) else repr(float(value))
