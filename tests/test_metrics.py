"""Hand-made cases for every task metric, including empty and unparseable answers."""

from __future__ import annotations

import math

import pytest
import sacrebleu

from components.evaluate.metrics import (
    ChoiceItem,
    circular_rotations,
    extract_choice,
    mmbench_accuracy,
    numeric_metrics,
    parse_fields,
    parse_item_set,
    parse_yes_no,
    pope_metrics,
    primary_score,
    score_task_family,
    seed_accuracy,
    set_metrics,
    text_metrics,
)

# ---------------------------------------------------------------- item sets


@pytest.mark.parametrize(
    "answer",
    [
        "red circle, blue square",
        "- Red circle\n- the blue square.",
        "red circle and a blue square",
        "Shapes: red circle; blue square!",
        "1. red circle\n2) blue square",
    ],
)
def test_item_set_parsing_normalises_lists(answer: str) -> None:
    assert parse_item_set(answer) == {"red circle", "blue square"}


def test_item_set_of_empty_or_non_string_is_empty() -> None:
    assert parse_item_set("") == frozenset()
    assert parse_item_set("  ,  ; \n") == frozenset()
    assert parse_item_set(None) == frozenset()


def test_set_metrics_iou_and_f1() -> None:
    # P = {salt, pepper, egg}, R = {salt, egg, milk, flour}: |P∩R| = 2, |P∪R| = 5.
    m = set_metrics(["salt, pepper and egg"], [["salt", "egg", "milk", "flour"]])
    assert m["iou"] == pytest.approx(100 * 2 / 5)
    assert m["f1"] == pytest.approx(100 * 2 * 2 / 7)
    assert m["unparseable"] == 0


def test_set_metrics_averages_per_sample_and_counts_unparseable() -> None:
    m = set_metrics(["salt, egg", "", None], ["egg, salt", "milk", "flour"])
    assert m["iou"] == pytest.approx(100 / 3)
    assert m["f1"] == pytest.approx(100 / 3)
    assert (m["n"], m["unparseable"]) == (3, 2)


def test_set_metrics_rejects_bad_references() -> None:
    with pytest.raises(ValueError, match=r"references\[0\]"):
        set_metrics(["salt"], [""])
    with pytest.raises(ValueError, match="pair up"):
        set_metrics(["salt", "egg"], ["salt"])
    with pytest.raises(ValueError, match="at least one"):
        set_metrics([], [])


# ---------------------------------------------------------------- free text


def test_text_metrics_perfect_and_partial() -> None:
    refs = ["mix the flour and the eggs then bake for twenty minutes", "boil the pasta in salted water"]
    perfect = text_metrics(refs, refs)
    assert perfect["bleu"] == pytest.approx(100.0)
    assert perfect["rouge_l"] == pytest.approx(100.0)
    preds = ["mix the flour and eggs then bake", "boil pasta"]
    partial = text_metrics(preds, refs)
    assert partial["bleu"] == pytest.approx(sacrebleu.corpus_bleu(preds, [refs]).score)
    assert 0 < partial["rouge_l"] < 100
    assert partial["unparseable"] == 0


def test_text_metrics_empty_answer_is_zero_not_error() -> None:
    m = text_metrics(["", "   "], ["a reference text", "another one"])
    assert m == {"bleu": 0.0, "rouge_l": 0.0, "n": 2.0, "unparseable": 2.0}


def test_rouge_l_is_the_mean_f_measure() -> None:
    # LCS("the cat sat", "the cat sat on mat") = 3: P = 1, R = 3/5, F = 0.75 ; second sample empty -> 0.
    m = text_metrics(["the cat sat", ""], ["the cat sat on mat", "x"])
    assert m["rouge_l"] == pytest.approx(100 * 0.75 / 2)


# ---------------------------------------------------------------- numeric fields


def test_parse_fields_formats() -> None:
    assert parse_fields("count: 3, area: 12.5") == {"count": 3.0, "area": 12.5}
    assert parse_fields("Mass: 1,200 g\nCalories = 300 kcal; total fat: -0.5") == {
        "mass": 1200.0, "cal": 300.0, "total_fat": -0.5,
    }
    assert parse_fields("no numbers here") == {}
    assert parse_fields(None) == {}


def test_pmae_per_field_and_average() -> None:
    refs = [{"mass": 100, "cal": 200}, "mass: 300 g, cal: 400 kcal"]
    preds = ["mass: 110 g, cal: 150 kcal", "Weight: 270, calories: 400"]
    m = numeric_metrics(preds, refs)
    assert m["pmae_mass"] == pytest.approx(100 * ((10 + 30) / 2) / 200)
    assert m["pmae_cal"] == pytest.approx(100 * ((50 + 0) / 2) / 300)
    assert m["pmae"] == pytest.approx((m["pmae_mass"] + m["pmae_cal"]) / 2)
    assert m["unparseable"] == 0


def test_missing_field_counts_the_full_true_value() -> None:
    m = numeric_metrics(["mass: 100", "I cannot tell"], [{"mass": 100, "cal": 50}, {"mass": 300, "cal": 150}])
    # mass errors 0 and 300 over mean 200; cal errors 50 and 150 over mean 100.
    assert m["pmae_mass"] == pytest.approx(75.0)
    assert m["pmae_cal"] == pytest.approx(100.0)
    assert (m["unparseable"], m["missing_fields"]) == (2, 3)


def test_unit_glued_to_next_name_still_matches() -> None:
    m = numeric_metrics(["mass: 120 g cal: 300"], [{"mass": 120, "cal": 300}])
    assert m["pmae"] == 0 and m["unparseable"] == 0


def test_pmae_undefined_field_is_left_out_and_all_undefined_raises() -> None:
    m = numeric_metrics(["a: 1, b: 2"], [{"a": 0, "b": 2}])
    assert "pmae_a" not in m and m["pmae"] == 0
    with pytest.raises(ValueError, match="positive mean"):
        numeric_metrics(["a: 1"], [{"a": 0}])
    with pytest.raises(ValueError, match=r"references\[0\]"):
        numeric_metrics(["a: 1"], ["nothing to read"])


# ---------------------------------------------------------------- SEED-Bench


def test_seed_first_letter_rule() -> None:
    m = seed_accuracy(["B", "C. a dog", " A", "(A)", "", "b"], ["B", "C", "A", "A", "A", "B"])
    # "(A)" starts with "(" and "b" is lower-case: lmms-eval scores both wrong.
    assert m["accuracy"] == pytest.approx(100 * 3 / 6)
    assert m["unparseable"] == 3


# ---------------------------------------------------------------- MMBench

OPTIONS = {"A": "a cat", "B": "a dog", "C": "a bird", "D": "a fish"}


@pytest.mark.parametrize(
    ("answer", "letter"),
    [
        ("B", "B"), ("(B)", "B"), ("B.", "B"), ("Answer: B", "B"), ("The answer is B).", "B"),
        ("It is a dog.", "B"), ("A", "A"), ("I see a cat or a dog", None), ("A dog is in a house", "B"),
        ("", None), ("no idea", None), (None, None), ("B or C", None),
    ],
)
def test_extract_choice(answer: str | None, letter: str | None) -> None:
    assert extract_choice(answer, OPTIONS) == letter


def test_circular_rotations_follow_the_answer() -> None:
    items = circular_rotations("q1", ["cat", "dog", "bird", "fish"], answer_index=1)
    assert [i.answer for i in items] == ["B", "A", "D", "C"]
    assert all(i.options[i.answer] == "dog" for i in items)
    with pytest.raises(ValueError, match="outside"):
        circular_rotations("q1", ["cat", "dog"], answer_index=2)


def test_mmbench_circular_needs_every_rotation_right() -> None:
    q1 = circular_rotations("q1", ["cat", "dog", "bird", "fish"], 1)
    q2 = circular_rotations("q2", ["red", "green", "blue", "black"], 0)
    preds = [i.answer for i in q1] + [i.answer for i in q2[:3]] + ["garbage"]
    m = mmbench_accuracy(preds, q1 + q2)
    assert m["accuracy"] == pytest.approx(50.0)
    assert m["vanilla_accuracy"] == pytest.approx(100 * 7 / 8)
    assert (m["n"], m["unparseable"]) == (2, 1)


# ---------------------------------------------------------------- POPE


@pytest.mark.parametrize(
    ("answer", "parsed"),
    [("yes", "yes"), (" No ", "no"), ("Yes, there is a dog.", "yes"), ("No.", "no"),
     ("There is no dog", None), ("", None), (None, None), ("yesterday", None)],
)
def test_parse_yes_no(answer: str | None, parsed: str | None) -> None:
    assert parse_yes_no(answer) == parsed


def test_pope_metrics_with_unparseable_as_false_negative() -> None:
    preds = ["yes", "Yes.", "no", "maybe", "yes", "no"]
    refs = ["yes", "yes", "yes", "yes", "no", "no"]
    m = pope_metrics(preds, refs)
    # TP 2, FN 2 (one said no, one unparseable), FP 1, TN 1.
    assert m["accuracy"] == pytest.approx(100 * 3 / 6)
    assert m["precision"] == pytest.approx(100 * 2 / 3)
    assert m["recall"] == pytest.approx(100 * 2 / 4)
    assert m["f1"] == pytest.approx(100 * 2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    assert m["unparseable"] == 1
    with pytest.raises(ValueError, match="'yes' or 'no'"):
        pope_metrics(["yes"], ["maybe"])


def test_pope_all_unparseable_scores_zero() -> None:
    m = pope_metrics(["", "???"], ["yes", "no"])
    assert m["accuracy"] == m["precision"] == m["recall"] == m["f1"] == 0.0


# ---------------------------------------------------------------- dispatch and score


def test_score_task_family_dispatch() -> None:
    assert score_task_family("ingredients", ["egg"], ["egg"])["iou"] == 100.0
    assert score_task_family("nutrition", ["cal: 10"], ["cal: 10"])["pmae"] == 0.0
    mm = score_task_family("mmbench", ["B"], [{"question_id": 1, "options": OPTIONS, "answer": "B"}])
    assert mm["accuracy"] == 100.0
    assert score_task_family("mmbench", ["B"], [ChoiceItem("1", OPTIONS, "B")])["accuracy"] == 100.0
    with pytest.raises(ValueError, match="unknown task family 'oops'; known: .*pope"):
        score_task_family("oops", ["x"], ["x"])
    with pytest.raises(ValueError, match="question_id, options"):
        score_task_family("mmbench", ["B"], ["B"])


def test_primary_score_definition() -> None:
    metrics = {
        "ingredients/iou": 20.0, "ingredients/f1": 30.0, "recipe/bleu": 10.0, "recipe/rouge_l": 40.0,
        "nutrition/pmae": 50.0, "nutrition/pmae_mass": 99.0, "pope/precision": 1.0, "ingredients/n": 500.0,
        "mmbench.accuracy": 60.0,
    }
    assert primary_score(metrics) == pytest.approx((20 + 30 + 10 + 40 + 50 + 60) / 6)
    assert primary_score({"pmae": 250.0, "iou": math.nan, "f1": 10.0}) == pytest.approx(5.0)
    with pytest.raises(ValueError, match="no metric to score"):
        primary_score({"loss": 1.0})
