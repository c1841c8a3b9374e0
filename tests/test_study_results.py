"""The results layer of method studies: per-variant statistics over seeds, comparisons paired by seed
with the reference, the Markdown and CSV tables, and Figure 5."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
from scipy import stats

from components.study.figure import draw_figure_5, figure_5
from components.study.results import Trial, lower_is_better, summarise, to_csv, to_markdown

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Reference: score 60, 62, 64 (mean 62, std 2); pMAE 40, 38, 42 (mean 40).
# Dual-LoRA: score 64, 65, 66 (mean 65, std 1); pMAE 36, 35, 37 (mean 36), better on every seed.
REFERENCE_SCORES = [60.0, 62.0, 64.0]
REFERENCE_PMAE = [40.0, 38.0, 42.0]
DUAL_SCORES = [64.0, 65.0, 66.0]
DUAL_PMAE = [36.0, 35.0, 37.0]


def study() -> list[Trial]:
    trials = []
    for seed in range(3):
        trials.append(Trial("lora_r64", seed, {"score": REFERENCE_SCORES[seed], "numeric/pmae": REFERENCE_PMAE[seed]},
                            adapter_mib=160.0, method="lora", rank=64))
        trials.append(Trial("dual_lora_r64", seed, {"score": DUAL_SCORES[seed], "numeric/pmae": DUAL_PMAE[seed]},
                            adapter_mib=170.0, method="dual_lora", rank=64))
    return trials


def test_mean_std_and_confidence_interval_match_hand_computation():
    row = summarise(study(), reference="lora_r64").row("lora_r64")
    score = row.metrics["score"]
    # Deviations -2, 0, 2: variance 8 / (3 - 1) = 4; t(0.975, df=2) = 4.302652729911275.
    half_width = 4.302652729911275 * 2.0 / math.sqrt(3)
    assert score.n == 3
    assert score.mean == pytest.approx(62.0)
    assert score.std == pytest.approx(2.0)
    assert score.ci_low == pytest.approx(62.0 - half_width)
    assert score.ci_high == pytest.approx(62.0 + half_width)
    assert score.ci_low == pytest.approx(57.0317, abs=1e-4)
    assert row.adapter_mib == 160.0
    assert row.is_reference and row.comparisons == {}


def test_confidence_level_changes_the_interval():
    score = summarise(study(), reference="lora_r64", confidence=0.99).row("lora_r64").metrics["score"]
    low, high = stats.t.interval(0.99, df=2, loc=62.0, scale=2.0 / math.sqrt(3))
    assert (score.ci_low, score.ci_high) == pytest.approx((low, high))


def test_relative_change_is_positive_when_better_in_either_direction():
    table = summarise(study(), reference="lora_r64")
    dual = table.row("dual_lora_r64")
    assert lower_is_better("numeric/pmae") and lower_is_better("numeric/pmae_area")
    assert not lower_is_better("score") and not lower_is_better("items/iou")
    assert dual.metrics["score"].relative_change == pytest.approx(100 * 3 / 62)
    # pMAE fell from 40 to 36: a 10 % drop, reported as +10 % (better).
    assert dual.metrics["numeric/pmae"].relative_change == pytest.approx(10.0)
    assert table.row("lora_r64").metrics["score"].relative_change == 0.0


def test_paired_wins_and_p_values_match_scipy():
    dual = summarise(study(), reference="lora_r64").row("dual_lora_r64")
    score, pmae = dual.comparisons["score"], dual.comparisons["numeric/pmae"]
    assert (score.n_paired, score.wins) == (3, 3)
    assert score.p_ttest == pytest.approx(stats.ttest_rel(DUAL_SCORES, REFERENCE_SCORES).pvalue)
    assert score.p_wilcoxon == pytest.approx(stats.wilcoxon(DUAL_SCORES, REFERENCE_SCORES).pvalue)
    # Differences 4, 3, 2: t = 3 / (1 / sqrt 3); exact Wilcoxon with all three positive: 2 / 2**3.
    assert score.p_ttest == pytest.approx(2 * stats.t.sf(3 * math.sqrt(3), df=2))
    assert score.p_wilcoxon == pytest.approx(0.25)
    assert (pmae.n_paired, pmae.wins) == (3, 3)  # lower pMAE on every seed counts as a win
    assert pmae.p_ttest == pytest.approx(stats.ttest_rel(DUAL_PMAE, REFERENCE_PMAE).pvalue)


def test_wins_count_only_seeds_where_the_variant_is_better():
    trials = [*study(), *(Trial("worse", seed, {"score": s, "numeric/pmae": p}, adapter_mib=1.0)
                          for seed, s, p in [(0, 61.0, 41.0), (1, 61.0, 37.0), (2, 63.0, 42.0)])]
    worse = summarise(trials, reference="lora_r64").row("worse")
    assert worse.comparisons["score"].wins == 1  # 61 > 60; 61 < 62; 63 < 64
    assert worse.comparisons["numeric/pmae"].wins == 1  # only 37 < 38; 42 = 42 is no win


def test_one_seed_gives_undefined_spread_and_tests_shown_as_n_a():
    trials = [*study(), Trial("lora_r16", 1, {"score": 57.0, "numeric/pmae": 45.0}, adapter_mib=40.0)]
    table = summarise(trials, reference="lora_r64")
    single = table.row("lora_r16")
    assert single.metrics["score"].mean == 57.0
    assert math.isnan(single.metrics["score"].std) and math.isnan(single.metrics["score"].ci_low)
    comparison = single.comparisons["score"]
    assert (comparison.n_paired, comparison.wins) == (1, 0)
    assert math.isnan(comparison.p_ttest) and math.isnan(comparison.p_wilcoxon)
    markdown = to_markdown(table)
    assert "| lora_r16 | 40.00 | 57.00 ± n/a [n/a, n/a] | -8.1 % |" in markdown
    assert "wins 0/1, p=n/a (t), p=n/a (Wilcoxon)" in markdown


def test_identical_results_give_no_p_value():
    trials = [*study(), *(Trial("same", seed, {"score": REFERENCE_SCORES[seed]}, adapter_mib=1.0) for seed in range(3))]
    comparison = summarise(trials, reference="lora_r64").row("same").comparisons["score"]
    assert (comparison.n_paired, comparison.wins) == (3, 0)
    assert math.isnan(comparison.p_ttest) and math.isnan(comparison.p_wilcoxon)


def test_pairing_is_by_seed_not_by_position():
    # Seeds 2, 0, 7 in that order: seed 1 is missing and seed 7 has no reference trial.
    partial = [Trial("vce", 2, {"score": 70.0}, 1.0), Trial("vce", 0, {"score": 61.0}, 1.0),
               Trial("vce", 7, {"score": 99.0}, 1.0)]
    row = summarise([*partial, *study()], reference="lora_r64").row("vce")
    comparison = row.comparisons["score"]
    assert row.seeds == (0, 2, 7)
    assert row.metrics["score"].mean == pytest.approx(np.mean([70.0, 61.0, 99.0]))
    assert (comparison.n_paired, comparison.wins) == (2, 2)
    paired_variant, paired_reference = [61.0, 70.0], [REFERENCE_SCORES[0], REFERENCE_SCORES[2]]
    assert comparison.p_ttest == pytest.approx(stats.ttest_rel(paired_variant, paired_reference).pvalue)
    assert comparison.p_wilcoxon == pytest.approx(stats.wilcoxon(paired_variant, paired_reference).pvalue)


def test_display_order_puts_the_reference_first_or_follows_order():
    trials = [Trial("b", 0, {"score": 1.0}, 1.0), Trial("ref", 0, {"score": 1.0}, 1.0), Trial("a", 0, {"score": 1.0}, 1.0)]
    assert summarise(trials, reference="ref").variants == ("ref", "b", "a")
    assert summarise(trials, reference="ref", order=["a", "ref"]).variants == ("a", "ref", "b")


@pytest.mark.parametrize(("trials", "reference", "order", "message"), [
    ([], "lora_r64", None, "at least one trial"),
    (study(), "lora_r8", None, "reference variant 'lora_r8' has no trials"),
    ([*study(), Trial("dual_lora_r64", 1, {"score": 1.0}, 170.0)], "lora_r64", None,
     "variant 'dual_lora_r64' has seed 1 twice"),
    (study(), "lora_r64", ["lora_r64", "moe_lora"], "order names variants with no trials: moe_lora"),
    (study(), "lora_r64", ["lora_r64", "lora_r64"], "more than once"),
])
def test_refusals_name_the_problem(trials, reference, order, message):
    with pytest.raises(ValueError, match=message):
        summarise(trials, reference=reference, order=order)


def test_markdown_has_the_expected_cells_and_caption():
    markdown = to_markdown(summarise(study(), reference="lora_r64"))
    lines = markdown.splitlines()
    assert lines[0] == ("| variant | adapter MiB | score | Δ score | numeric/pmae (lower is better) | Δ numeric/pmae "
                        "| vs lora_r64 (score) |")
    assert lines[2] == ("| **lora_r64** (ref) | 160.00 | 62.00 ± 2.00 [57.03, 66.97] | ref "
                        "| 40.00 ± 2.00 [35.03, 44.97] | ref | ref |")
    assert lines[3].startswith("| dual_lora_r64 | 170.00 | 65.00 ± 1.00 [62.52, 67.48] | +4.8 % "
                               "| 36.00 ± 1.00 [33.52, 38.48] | +10.0 % |")
    assert lines[3].endswith("| wins 3/3, p=0.035 (t), p=0.25 (Wilcoxon) |")
    caption = lines[-1]
    assert "3 seeds per variant" in caption and "95 % confidence interval" in caption
    assert "positive = better" in caption and "lower-is-better numeric/pmae" in caption


def test_markdown_metric_selection_and_primary_metric():
    markdown = to_markdown(summarise(study(), reference="lora_r64"), metrics=["numeric/pmae"], primary="numeric/pmae")
    assert "| score |" not in markdown.splitlines()[0]
    assert "vs lora_r64 (numeric/pmae)" in markdown
    with pytest.raises(ValueError, match="metrics not in the study: items/f1"):
        to_markdown(summarise(study(), reference="lora_r64"), metrics=["items/f1"])


def test_csv_round_trip_gives_the_same_numbers(tmp_path):
    trials = [*study(), Trial("lora_r16", 0, {"score": 57.0}, adapter_mib=40.0)]
    table = summarise(trials, reference="lora_r64")
    path = to_csv(table, tmp_path / "tables" / "study.csv")
    with path.open(newline="") as handle:
        rows = {row["variant"]: row for row in csv.DictReader(handle)}
    assert list(rows) == ["lora_r64", "dual_lora_r64", "lora_r16"]
    for variant, row in rows.items():
        expected = table.row(variant)
        assert float(row["adapter_mib"]) == expected.adapter_mib
        assert int(row["seeds"]) == len(expected.seeds)
        for metric, summary in expected.metrics.items():
            for statistic in ("mean", "std", "ci_low", "ci_high", "relative_change"):
                value, wanted = float(row[f"{metric}:{statistic}"]), getattr(summary, statistic)
                assert value == wanted or (math.isnan(value) and math.isnan(wanted)), (variant, metric, statistic)
    dual = table.row("dual_lora_r64").comparisons["score"]
    assert int(rows["dual_lora_r64"]["score:wins"]) == dual.wins == 3
    assert float(rows["dual_lora_r64"]["score:p_ttest"]) == dual.p_ttest
    assert float(rows["dual_lora_r64"]["score:p_wilcoxon"]) == dual.p_wilcoxon
    assert rows["lora_r64"]["is_reference"] == "1" and rows["lora_r64"]["score:p_ttest"] == ""
    assert math.isnan(float(rows["lora_r16"]["score:std"]))
    assert rows["lora_r16"]["numeric/pmae:mean"] == ""  # the variant has no pMAE


def rank_sweep() -> list[Trial]:
    """LoRA and Dual-LoRA at ranks 8, 16 and 64 (5 to 40 MiB and up), two seeds each, listed out of order."""
    trials = []
    for method, extra in [("lora", 0.0), ("dual_lora", 1.0)]:
        for rank in (64, 8, 16):
            for seed in (0, 1):
                trials.append(Trial(f"{method}_r{rank}", seed, {"score": 50 + rank / 8 + extra + seed},
                                    adapter_mib=rank * 0.625 * (1 + extra * 0.1), method=method, rank=rank))
    return trials


def test_figure_5_is_a_png(tmp_path):
    path = figure_5(rank_sweep(), tmp_path / "figures" / "figure_5.png")
    assert path == tmp_path / "figures" / "figure_5.png"
    assert path.read_bytes()[:8] == PNG_SIGNATURE


def test_figure_5_draws_one_line_per_method_sorted_by_size():
    ax = draw_figure_5(rank_sweep()).axes[0]
    assert len(ax.containers) == 2
    assert [text.get_text() for text in ax.get_legend().get_texts()] == ["lora", "dual_lora"]
    assert ax.get_xscale() == "log"  # 5 MiB to 40 MiB is more than 4x
    assert ax.get_xlabel() == "trainable adapter size (MiB)" and ax.get_ylabel() == "score"
    lora_line = ax.containers[0].lines[0]
    assert list(lora_line.get_xdata()) == [5.0, 10.0, 40.0]
    assert list(lora_line.get_ydata()) == [51.5, 52.5, 58.5]
    assert ax.get_title()


def test_figure_5_stays_linear_for_a_narrow_size_range_and_refuses_merged_points():
    narrow = [t for t in rank_sweep() if t.method == "lora" and t.rank != 8]  # 10 to 40 MiB: exactly 4x
    assert draw_figure_5(narrow).axes[0].get_xscale() == "linear"
    clash = [*rank_sweep(), Trial("lora_r64_vce", 0, {"score": 1.0}, 40.0, method="lora", rank=64)]
    with pytest.raises(ValueError, match="method 'lora' has two variants at rank 64"):
        draw_figure_5(clash)


def test_compare_with_gives_a_variant_its_own_reference() -> None:
    # Dual-LoRA r16 against LoRA r16 (same rank), the LoRA rows against the study's reference LoRA r8.
    table = summarise(rank_sweep(), "lora_r8", compare_with={"dual_lora_r16": "lora_r16"})
    dual, lora16 = table.row("dual_lora_r16"), table.row("lora_r16")
    assert dual.compared_with == "lora_r16" and lora16.compared_with == "lora_r8"
    assert dual.metrics["score"].relative_change == pytest.approx(100 * 1.0 / lora16.metrics["score"].mean)
    assert dual.comparisons["score"].wins == 2 and dual.comparisons["score"].n_paired == 2
    assert table.row("dual_lora_r8").compared_with == "lora_r8"  # not named: the study's reference
    markdown = to_markdown(table)
    assert "| vs reference (score) |" in markdown and "vs lora_r16: wins 2/2" in markdown
    with pytest.raises(ValueError, match="compare_with names variants with no trials: nope"):
        summarise(rank_sweep(), "lora_r8", compare_with={"dual_lora_r16": "nope"})
