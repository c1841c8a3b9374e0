"""MMBench option extraction: one test per rule of lmms-eval's ``can_infer`` that ``extract_choice`` follows."""

from __future__ import annotations

import pytest

from components.evaluate.metrics import ChoiceItem, extract_choice, mmbench_accuracy

OPTIONS = {"A": "a cat", "B": "a dog", "C": "a bird", "D": "a fish"}


@pytest.mark.parametrize("answer", ["", "   \n", None, 3])
def test_empty_or_non_string_answer_is_unparseable(answer: object) -> None:
    assert extract_choice(answer, OPTIONS) is None


@pytest.mark.parametrize(("answer", "letter"), [("A", "A"), (" C\n", "C"), ("Answer: B", "B"), ("B B", "B")])
def test_single_bare_letter(answer: str, letter: str) -> None:
    assert extract_choice(answer, OPTIONS) == letter


@pytest.mark.parametrize(
    ("answer", "letter"),
    [
        ("It is A", "A"),  # three tokens: "A" is read as the letter
        ("I think A is right", None),  # more than three tokens: "A" may be the article, bare step skipped
        ("A or B? B.", "B"),  # bare step skipped, the wrapped "B." still decides
    ],
)
def test_bare_a_among_more_than_three_tokens_is_not_a_letter(answer: str, letter: str | None) -> None:
    assert extract_choice(answer, OPTIONS) == letter


@pytest.mark.parametrize(
    ("answer", "letter"),
    [
        ("The answer is B.", "B"), ("C,", "C"), ("D: a fish", "D"), ("B)", "B"), ("The answer is B).", "B"),
        ("(C)", "C"), ("(B).", "B"), ("Answer :D", "D"), ("Answer :C.", "C"),
    ],
)
def test_single_wrapped_letter(answer: str, letter: str) -> None:
    assert extract_choice(answer, OPTIONS) == letter


def test_wrapped_forms_are_tried_in_order() -> None:
    # "A." (letter then period) is tried before "B," (letter then comma), whatever their positions.
    assert extract_choice("B, no: A.", OPTIONS) == "A"


@pytest.mark.parametrize("answer", ["B E", "B or C", "B. or C.", "(A) or (D)", "C D E"])
def test_several_candidate_letters_are_unparseable(answer: str) -> None:
    assert extract_choice(answer, OPTIONS) is None


def test_candidates_are_a_to_e_whatever_the_options() -> None:
    assert extract_choice("E", OPTIONS) == "E"  # decided, outside the options: scores wrong
    assert extract_choice("B F", OPTIONS) == "B"  # F is no candidate, so B is the only letter
    assert extract_choice("F", OPTIONS) is None


@pytest.mark.parametrize("answer", ["b", "(b)", "answer: c.", "**B**", "[B]", "B!"])
def test_letters_are_case_sensitive_and_punctuation_is_kept(answer: str) -> None:
    assert extract_choice(answer, OPTIONS) is None


def test_api_failure_marker_skips_the_letter_step() -> None:
    assert extract_choice("Failed to obtain answer via API B", OPTIONS) is None
    assert extract_choice("Failed to obtain answer via API: a dog", OPTIONS) == "B"


@pytest.mark.parametrize(
    ("answer", "letter"),
    [
        ("It is a dog.", "B"),
        ("It is A DOG", "B"),  # lower-cased on both sides; the bare "A" is skipped among four tokens
        ("a catalogue", "A"),  # a substring, not a word, is enough
        ("B, a cat", "B"),  # the text step runs only when the letter step decides nothing
    ],
)
def test_text_of_exactly_one_option(answer: str, letter: str) -> None:
    assert extract_choice(answer, OPTIONS) == letter


@pytest.mark.parametrize("answer", ["a cat and a dog", "I see a cat or a dog", "a fish, or maybe a bird"])
def test_texts_of_several_options_are_unparseable(answer: str) -> None:
    assert extract_choice(answer, OPTIONS) is None


def test_blank_option_texts_are_skipped() -> None:
    assert extract_choice("a dog", {"A": "", "B": "a dog", "C": "  "}) == "B"


@pytest.mark.parametrize(
    ("answer", "letter"),
    [
        ("Cannot determine the answer", None),
        ("I'm sorry, but without the image provided I cannot answer.", None),
        # lmms-eval has no refusal rule (VLMEvalKit's "Z" is not followed): the letter still counts.
        ("Sorry, I can't help with images of people yet. B", "B"),
    ],
)
def test_refusals_have_no_rule_of_their_own(answer: str, letter: str | None) -> None:
    assert extract_choice(answer, OPTIONS) == letter


def test_accuracy_counts_undecided_as_unparseable_and_outside_letters_as_wrong() -> None:
    items = [ChoiceItem(str(i), OPTIONS, "B") for i in range(4)]
    m = mmbench_accuracy(["B E", "E", "The answer is B.", "a dog"], items)
    assert m["vanilla_accuracy"] == pytest.approx(50.0)
    assert m["unparseable"] == 1
