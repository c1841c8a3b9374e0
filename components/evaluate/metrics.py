"""Task metrics of the paper (section 4.2) and the general benchmarks, plus the registry's score.

Every function is pure: predictions are the model's raw answers, references the
ground truth. A prediction that cannot be parsed (empty, whitespace, not a
string, no recognisable answer) scores as wrong or worst and is counted in the
result's ``unparseable`` entry; it never raises. References are ground truth, so
a malformed reference is a data bug and raises ``ValueError`` naming the item.
Percentages are on 0-100 like the paper's tables.

Parsing rules
-------------
Item sets (ingredient recognition) -> ``iou``, ``f1``
    The answer is lower-cased; a leading header of one to three words ending in a
    colon ("Ingredients: ...") is dropped; list markers at line starts ("-", "*",
    "•", "1.", "2)") are dropped; the text is split on newlines, commas, semicolons
    and the word "and". Each item then has every character that is not a letter,
    digit or space replaced by a space, the articles a/an/the removed, and
    whitespace collapsed; empty items are dropped. IoU = |P∩R| / |P∪R| and
    F1 = 2|P∩R| / (|P| + |R|) per sample, averaged over samples. An empty parsed
    set scores 0 and is unparseable. References are parsed the same way (or given
    as a list of item strings).

Free text (recipe generation, captions) -> ``bleu``, ``rouge_l``
    SacreBLEU ``corpus_bleu`` with its default 13a tokenisation over the whole set;
    ROUGE-L F-measure from ``rouge_score`` (Porter stemming) per sample, averaged.
    An empty answer is scored as the empty hypothesis (BLEU) and 0 (ROUGE-L).

Numeric fields (nutrition estimation, counts) -> ``pmae``, ``pmae_<field>``
    The answer holds ``field: value`` pairs (``=`` also accepted) separated by
    anything, e.g. ``"count: 3, area: 12.5"`` or UniFood's
    ``"mass: 120 g, cal: 300 kcal, fat: 10.5 g, protein: 20 g, carb: 30 g"``.
    Field names are lower-cased with spaces as underscores and mapped through
    ``FIELD_ALIASES`` (calories -> cal, carbs -> carb, weight -> mass, ...); when a
    unit runs into the next name without a separator ("120 g cal: 300") the name
    "g_cal" still answers for the reference field "cal" (suffix match); a value
    is a decimal number, optionally signed, with optional thousands commas
    ("1,200"); units after it are ignored; the first occurrence of a field wins.
    pMAE of a field = mean |pred - true| / mean true * 100 over the samples whose
    reference has that field (lower is better); ``pmae`` is the mean over fields.
    A field missing from the answer counts with error |0 - true| = true (the model
    said nothing, which is as wrong as predicting zero) and the sample counts as
    unparseable. A field whose reference mean is not positive has no defined pMAE
    and is left out. References are dicts of numbers or strings in the same format.

SEED-Bench -> ``accuracy``
    As lmms-eval's ``seed_process_result``: the answer is stripped and its first
    character compared, case-sensitively, with the answer letter. A first character
    outside the option letters (A-D) is unparseable.

MMBench -> ``accuracy`` (circular), ``vanilla_accuracy``
    Option extraction follows lmms-eval's rule-based prefetch (``can_infer``); the
    rules are listed in ``extract_choice``. In short: exactly one of the letters
    A-E (upper case, whatever the question's options) as a whitespace-separated
    token, bare ("B", "Answer: B"; skipped when the token "A" occurs among more
    than three tokens, where it may be an article) or else in the first wrapped
    form (``B.``, ``B,``, ``B:``, ``B)``, ``(B)``, ``:B`` ...) that has exactly
    one; failing that, exactly one option's text in the lower-cased answer. A
    decided letter outside the options ("E" of four) is kept and scores wrong.
    Anything else ("B E", "B or C", two option texts) is undecided: lmms-eval
    would ask a judge model, duet has none, so it is unparseable and wrong.
    Circular evaluation: the rotations of a question share a ``question_id``; the
    question is correct only if every rotation is. ``circular_rotations`` builds
    the rotated option sets.

POPE -> ``accuracy``, ``precision``, ``recall``, ``f1`` (positive = "yes")
    lmms-eval's ``pope_process_results`` lower-cases and strips the answer and
    compares it exactly with "yes"/"no". The same happens here, and in addition an
    answer whose first word (punctuation removed) is "yes" or "no" counts as that
    ("Yes, there is a dog." -> yes), as LLaVA's own POPE script accepts sentences.
    Anything else is unparseable: wrong for accuracy, not a positive prediction for
    precision, and a false negative when the truth is "yes" (lmms-eval instead
    leaves it out of recall; counting it keeps a model from gaining recall by
    rambling).

The registry's ``score``
    ``primary_score`` averages, over every entry of a metrics dict whose name
    (after the last "/" or ".") is one of iou, f1, bleu, rouge_l, accuracy, the
    value as is, and for pmae the value 100 - pmae clipped to [0, 100]. All are
    on 0-100 and higher is better, so ``score`` is too. Per-field pMAE, precision,
    recall and counts are not part of it; non-finite values are skipped.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sacrebleu
from rouge_score import rouge_scorer

Metrics = dict[str, float]

# ---------------------------------------------------------------- item sets

_HEADER = re.compile(r"^\s*[^\W\d_]+(?:\s+[^\W\d_]+){0,2}\s*:(?!\d)")
_LIST_MARKER = re.compile(r"^\s*(?:[-*•]+|\d+[.)])\s+", re.MULTILINE)
_ITEM_SPLIT = re.compile(r"[\n,;]|\band\b")
_NON_WORD = re.compile(r"[^\w\s]|_")
_ARTICLES = re.compile(r"\b(?:a|an|the)\b")


def _as_text(value: Any) -> str:
    """Model output as a string; anything that is not one is treated as empty."""
    return value if isinstance(value, str) else ""


def parse_item_set(text: Any) -> frozenset[str]:
    """Normalised set of items in an answer (rules in the module docstring); empty when unparseable."""
    body = _as_text(text).lower()
    body = _HEADER.sub("", body, count=1)
    body = _LIST_MARKER.sub("", body)
    items = set()
    for raw in _ITEM_SPLIT.split(body):
        item = _ARTICLES.sub(" ", _NON_WORD.sub(" ", raw))
        item = " ".join(item.split())
        if item:
            items.add(item)
    return frozenset(items)


def _reference_set(reference: Any, index: int) -> frozenset[str]:
    if isinstance(reference, str):
        items = parse_item_set(reference)
    elif isinstance(reference, Sequence) and all(isinstance(r, str) for r in reference):
        items = frozenset(i for r in reference for i in parse_item_set(r))
    else:
        raise ValueError(f"references[{index}]: expected a string or a list of item strings, got {reference!r}")
    if not items:
        raise ValueError(f"references[{index}]: no items after parsing {reference!r}")
    return items


def set_metrics(predictions: Sequence[Any], references: Sequence[Any]) -> Metrics:
    """Mean per-sample IoU and F1 (percent) of parsed item sets."""
    _check_lengths(predictions, references)
    iou_sum = f1_sum = 0.0
    unparseable = 0
    for i, (pred, ref) in enumerate(zip(predictions, references)):
        truth = _reference_set(ref, i)
        guess = parse_item_set(pred)
        if not guess:
            unparseable += 1
            continue
        common = len(guess & truth)
        iou_sum += common / len(guess | truth)
        f1_sum += 2 * common / (len(guess) + len(truth))
    n = len(predictions)
    return {"iou": 100 * iou_sum / n, "f1": 100 * f1_sum / n, "n": float(n), "unparseable": float(unparseable)}


# ---------------------------------------------------------------- free text

_ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def text_metrics(predictions: Sequence[Any], references: Sequence[Any]) -> Metrics:
    """Corpus SacreBLEU and mean ROUGE-L F-measure, both on 0-100."""
    _check_lengths(predictions, references)
    for i, ref in enumerate(references):
        if not isinstance(ref, str):
            raise ValueError(f"references[{i}]: expected a string, got {type(ref).__name__}")
    hyps = [_as_text(p).strip() for p in predictions]
    unparseable = sum(1 for h in hyps if not h)
    bleu = sacrebleu.corpus_bleu(hyps, [list(references)]).score
    rouge = sum(_ROUGE.score(ref, hyp)["rougeL"].fmeasure if hyp else 0.0 for ref, hyp in zip(references, hyps))
    n = len(hyps)
    return {"bleu": float(bleu), "rouge_l": 100 * rouge / n, "n": float(n), "unparseable": float(unparseable)}


# ---------------------------------------------------------------- numeric fields

FIELD_ALIASES = {
    "calories": "cal", "calorie": "cal", "kcal": "cal", "energy": "cal",
    "carbs": "carb", "carbohydrate": "carb", "carbohydrates": "carb",
    "weight": "mass", "proteins": "protein", "fats": "fat",
}
_PAIR = re.compile(
    r"([^\W\d_][\w \-]*?)\s*[:=]\s*([-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+)(?![\d,]*\d)"
)


def _field_name(raw: str) -> str:
    name = "_".join(raw.strip().lower().replace("-", " ").split())
    return FIELD_ALIASES.get(name, name)


def parse_fields(text: Any) -> dict[str, float]:
    """``field: value`` pairs of an answer (rules in the module docstring); first occurrence wins."""
    fields: dict[str, float] = {}
    for name, value in _PAIR.findall(_as_text(text)):
        fields.setdefault(_field_name(name), float(value.replace(",", "")))
    return fields


def _lookup(guess: Mapping[str, float], field: str) -> float | None:
    """A field's predicted value; a name that swallowed a preceding unit ("g_cal") still matches "cal"."""
    if field in guess:
        return guess[field]
    return next((v for k, v in guess.items() if k.endswith("_" + field)), None)


def _reference_fields(reference: Any, index: int) -> dict[str, float]:
    if isinstance(reference, Mapping):
        try:
            fields = {_field_name(str(k)): float(v) for k, v in reference.items()}
        except (TypeError, ValueError):
            raise ValueError(f"references[{index}]: every value must be a number, got {reference!r}") from None
    elif isinstance(reference, str):
        fields = parse_fields(reference)
    else:
        raise ValueError(f"references[{index}]: expected a dict or 'field: value' text, got {reference!r}")
    if not fields:
        raise ValueError(f"references[{index}]: no 'field: value' pairs in {reference!r}")
    return fields


def numeric_metrics(predictions: Sequence[Any], references: Sequence[Any]) -> Metrics:
    """pMAE per field and averaged over fields (percent, lower is better)."""
    _check_lengths(predictions, references)
    errors: dict[str, list[float]] = {}
    truths: dict[str, list[float]] = {}
    unparseable = missing = 0
    for i, (pred, ref) in enumerate(zip(predictions, references)):
        truth = _reference_fields(ref, i)
        guess = parse_fields(pred)
        found = {field: _lookup(guess, field) for field in truth}
        absent = [f for f, v in found.items() if v is None]
        missing += len(absent)
        unparseable += bool(absent)
        for field, true in truth.items():
            errors.setdefault(field, []).append(abs((found[field] or 0.0) - true))
            truths.setdefault(field, []).append(true)
    result: Metrics = {}
    for field, errs in errors.items():
        mean_true = sum(truths[field]) / len(truths[field])
        if mean_true > 0:
            result[f"pmae_{field}"] = 100 * (sum(errs) / len(errs)) / mean_true
    if not result:
        raise ValueError("references: no field has a positive mean value, so pMAE is undefined for every field")
    result["pmae"] = sum(result.values()) / len(result)
    n = len(predictions)
    result.update({"n": float(n), "unparseable": float(unparseable), "missing_fields": float(missing)})
    return result


# ---------------------------------------------------------------- multiple choice

def seed_choice(prediction: Any, letters: str = "ABCD") -> str | None:
    """SEED-Bench answer letter: the stripped answer's first character, or None when not an option."""
    text = _as_text(prediction).strip()
    return text[0] if text and text[0] in letters else None


def seed_accuracy(predictions: Sequence[Any], answers: Sequence[str], letters: str = "ABCD") -> Metrics:
    """Share of answers whose first character equals the answer letter (lmms-eval SEED rule)."""
    _check_lengths(predictions, answers)
    choices = [seed_choice(p, letters) for p in predictions]
    correct = sum(1 for c, a in zip(choices, answers) if c is not None and c == a)
    n = len(choices)
    return {"accuracy": 100 * correct / n, "n": float(n), "unparseable": float(choices.count(None))}


# Upstream's letter step looks at the letters A-E whatever the question's options are (num_choice=5).
_CANDIDATE_LETTERS = "ABCDE"
# Upstream's marker of a failed judge request; an answer holding it skips the letter step.
_API_FAILURE = "Failed to obtain answer via API"
# Wrapped letter forms (prefix, suffix), tried in this order; the first form naming exactly one letter wins.
_WRAPPERS = [
    ("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"), ("(", ")."),
    (":", ""), (":", ","), (":", "."), (":", ")"), (":", ")."),
]


def _single_letter(tokens: list[str], prefix: str = "", suffix: str = "") -> str | None:
    """The one candidate letter written as a ``prefix + letter + suffix`` token; None for none or several."""
    hits = [c for c in _CANDIDATE_LETTERS if prefix + c + suffix in tokens]
    return hits[0] if len(hits) == 1 else None


def _letter_in_answer(answer: str) -> str | None:
    """Letter step of ``extract_choice`` (upstream ``can_infer_option``)."""
    if _API_FAILURE in answer:
        return None
    tokens = answer.split()
    bare = _single_letter(tokens)
    # With more than three tokens a bare "A" may be the article, so the bare step is skipped altogether.
    if bare is not None and not ("A" in tokens and len(tokens) > 3):
        return bare
    for prefix, suffix in _WRAPPERS:
        wrapped = _single_letter(tokens, prefix, suffix)
        if wrapped is not None:
            return wrapped
    return None


def _option_text_in_answer(answer: str, options: Mapping[str, str]) -> str | None:
    """Text step of ``extract_choice`` (upstream ``can_infer_text``): the one option whose text the answer holds."""
    lowered = answer.lower()
    hits = [k for k, v in options.items() if str(v).strip() and str(v).lower() in lowered]
    return hits[0] if len(hits) == 1 else None


def extract_choice(prediction: Any, options: Mapping[str, str]) -> str | None:
    """Option letter a free-form MMBench answer names, or None when it names none or is ambiguous.

    Follows lmms-eval's rule-based prefetch, ``MMBench_Evaluator.can_infer``, so that duet's
    MMBench numbers are comparable with lmms-eval's:

    1. The answer is stripped; a non-string or empty answer is unparseable.
    2. Letter step (``can_infer_option``). The candidates are the upper-case letters A-E, whatever
       letters the question has; tokens are the answer split on whitespace, punctuation kept, case
       sensitive ("b" and "**B**" are not letters). Counting distinct letters, not occurrences:
       a. if exactly one candidate is a bare token ("B", "Answer: B") it is the answer -- unless
          the token "A" occurs among more than three tokens ("A dog is ..."), where the bare
          step is skipped because "A" may be the article;
       b. otherwise each wrapped form of ``_WRAPPERS`` (``B.``, ``B,``, ``B:``, ``B)``, ``B).``,
          ``(B)``, ``(B).``, ``:B``, ``:B,``, ...) is tried in order and the first naming exactly
          one letter wins ("B, no: A." -> A, since ``A.`` is tried before ``B,``);
       c. when every form names no letter or several ("B E", "B or C") the step decides nothing.
       An answer holding "Failed to obtain answer via API" skips this step.
    3. Text step (``can_infer_text``), when the letter step decided nothing: the option whose
       lower-cased text is a substring of the lower-cased answer, if exactly one option's is.
    4. Anything else is undecided.

    A decided letter may lie outside the question's options ("E" on a four-option question); it
    is returned and scores as wrong, as upstream. Where duet differs: lmms-eval hands an undecided
    answer to a judge model (its judge-free ``mmbench_en_dev_static`` task to the looser
    ``extract_mcq_answer``), duet has none, so undecided returns None (unparseable, wrong); blank
    option texts are skipped in the text step (upstream would count an empty text as contained in
    every answer). VLMEvalKit's ``can_infer_option``, from which lmms-eval's derives, adds rules
    lmms-eval does not have and duet does not follow: punctuation replaced by spaces, refusal
    phrases and a "Z" letter for "none of the options", and a length limit on the text step.
    """
    text = _as_text(prediction).strip()
    if not text:
        return None
    return _letter_in_answer(text) or _option_text_in_answer(text, options)


@dataclass(frozen=True)
class ChoiceItem:
    """One (possibly rotated) multiple-choice question: options by letter and the correct letter."""

    question_id: str
    options: Mapping[str, str]
    answer: str


def circular_rotations(question_id: str, options: Sequence[str], answer_index: int) -> list[ChoiceItem]:
    """The MMBench circular variants: option texts rotated through the letters, answer letter following."""
    if not 0 <= answer_index < len(options):
        raise ValueError(f"answer_index {answer_index} is outside the {len(options)} options of {question_id!r}")
    letters = "ABCDEFGH"[: len(options)]
    items = []
    for shift in range(len(options)):
        rotated = list(options[shift:]) + list(options[:shift])
        items.append(ChoiceItem(question_id, dict(zip(letters, rotated)), letters[(answer_index - shift) % len(options)]))
    return items


def mmbench_accuracy(predictions: Sequence[Any], items: Sequence[ChoiceItem]) -> Metrics:
    """Circular accuracy (a question counts only if all its rotations are right) and per-item accuracy."""
    _check_lengths(predictions, items)
    by_question: dict[str, bool] = {}
    unparseable = correct_items = 0
    for pred, item in zip(predictions, items):
        choice = extract_choice(pred, item.options)
        unparseable += choice is None
        right = choice is not None and choice == item.answer
        correct_items += right
        by_question[item.question_id] = by_question.get(item.question_id, True) and right
    questions = len(by_question)
    return {
        "accuracy": 100 * sum(by_question.values()) / questions,
        "vanilla_accuracy": 100 * correct_items / len(items),
        "n": float(questions),
        "unparseable": float(unparseable),
    }


# ---------------------------------------------------------------- yes / no

def parse_yes_no(prediction: Any) -> str | None:
    """'yes' or 'no' from a POPE answer (rule in the module docstring), or None when neither."""
    text = _as_text(prediction).lower().strip()
    if text in ("yes", "no"):
        return text
    words = text.split(maxsplit=1)
    first = _NON_WORD.sub("", words[0]) if words else ""
    return first if first in ("yes", "no") else None


def pope_metrics(predictions: Sequence[Any], answers: Sequence[str]) -> Metrics:
    """Accuracy, precision, recall and F1 with "yes" as the positive class (percent)."""
    _check_lengths(predictions, answers)
    tp = fp = fn = correct = unparseable = 0
    for i, (pred, answer) in enumerate(zip(predictions, answers)):
        truth = answer.lower().strip() if isinstance(answer, str) else None
        if truth not in ("yes", "no"):
            raise ValueError(f"references[{i}]: POPE answers are 'yes' or 'no', got {answer!r}")
        guess = parse_yes_no(pred)
        unparseable += guess is None
        correct += guess == truth
        tp += guess == "yes" and truth == "yes"
        fp += guess == "yes" and truth == "no"
        fn += guess != "yes" and truth == "yes"
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    n = len(predictions)
    return {
        "accuracy": 100 * correct / n, "precision": 100 * precision, "recall": 100 * recall, "f1": 100 * f1,
        "n": float(n), "unparseable": float(unparseable),
    }


# ---------------------------------------------------------------- dispatch and score

def _mmbench_from_references(predictions: Sequence[Any], references: Sequence[Any]) -> Metrics:
    items = []
    for i, ref in enumerate(references):
        if isinstance(ref, ChoiceItem):
            items.append(ref)
        elif isinstance(ref, Mapping) and {"question_id", "options", "answer"} <= ref.keys():
            items.append(ChoiceItem(str(ref["question_id"]), dict(ref["options"]), str(ref["answer"])))
        else:
            raise ValueError(
                f"references[{i}]: MMBench references need question_id, options (letter -> text) and answer; "
                f"got {ref!r}"
            )
    return mmbench_accuracy(predictions, items)


TASK_FAMILIES: dict[str, Callable[[Sequence[Any], Sequence[Any]], Metrics]] = {
    "set": set_metrics, "ingredients": set_metrics, "ingredient_recognition": set_metrics,
    "text": text_metrics, "recipe": text_metrics, "recipe_generation": text_metrics, "caption": text_metrics,
    "numeric": numeric_metrics, "nutrition": numeric_metrics, "nutrition_estimation": numeric_metrics,
    "seed": seed_accuracy, "mmbench": _mmbench_from_references, "pope": pope_metrics,
}


def score_task_family(task: str, predictions: Sequence[Any], references: Sequence[Any]) -> Metrics:
    """Metrics of one task family by name (see ``TASK_FAMILIES``); MMBench references are ChoiceItems or dicts."""
    scorer = TASK_FAMILIES.get(task)
    if scorer is None:
        raise ValueError(f"unknown task family {task!r}; known: {', '.join(sorted(TASK_FAMILIES))}")
    return scorer(predictions, references)


_SCORE_PARTS = {"iou", "f1", "bleu", "rouge_l", "accuracy"}


def primary_score(metrics: Mapping[str, float]) -> float:
    """The registry gate's ``score`` (definition in the module docstring), on 0-100, higher is better."""
    parts = []
    for key, value in metrics.items():
        name = re.split(r"[/.]", key)[-1]
        if not isinstance(value, int | float) or not math.isfinite(value):
            continue
        if name in _SCORE_PARTS:
            parts.append(float(value))
        elif name == "pmae":
            parts.append(min(100.0, max(0.0, 100.0 - value)))
    if not parts:
        raise ValueError(
            f"no metric to score among {sorted(metrics)}; expected names ending in "
            f"{', '.join(sorted(_SCORE_PARTS | {'pmae'}))}"
        )
    return sum(parts) / len(parts)


def _check_lengths(predictions: Sequence[Any], references: Sequence[Any]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references: they must pair up")
    if not predictions:
        raise ValueError("no predictions to score: pass at least one prediction/reference pair")
