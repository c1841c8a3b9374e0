"""Chat templates: exact prompt text, labels on assistant tokens only, image placeholder expansion."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from components.data.conversation import (
    IGNORE_INDEX,
    VICUNA_SYSTEM,
    ConversationError,
    EmptyAnswerError,
    ImageMismatchError,
    SequenceTooLongError,
    encode_conversation,
    render,
)

TWO_TURNS = [
    {"from": "human", "value": "<image>\nList the shapes."},
    {"from": "gpt", "value": "red circle"},
    {"from": "human", "value": "How many?"},
    {"from": "gpt", "value": "count: 1"},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_processor_dir: str) -> PreTrainedTokenizerFast:
    return AutoTokenizer.from_pretrained(tiny_processor_dir)


def test_vicuna_prompt_text_is_llavas() -> None:
    r = render(TWO_TURNS, "vicuna_v1", "</s>")
    assert r.text == (
        f"{VICUNA_SYSTEM} USER: <image>\nList the shapes. ASSISTANT: red circle</s>"
        "USER: How many? ASSISTANT: count: 1</s>"
    )
    assert [r.text[s:e] for s, e in r.label_spans] == [" red circle</s>", " count: 1</s>"]


def test_two_turn_labels_token_by_token(tokenizer: PreTrainedTokenizerFast) -> None:
    n_visual = 5
    out = encode_conversation(TWO_TURNS, tokenizer, "vicuna_v1", num_visual_tokens=n_visual, max_length=512)
    ids, labels = out["input_ids"], out["labels"]
    assert ids.dtype == np.int64 and ids.shape == labels.shape
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    # The one placeholder became exactly n_visual consecutive image tokens, none of them labelled.
    positions = np.flatnonzero(ids == image_id)
    assert len(positions) == n_visual and np.all(np.diff(positions) == 1)
    assert np.all(labels[positions] == IGNORE_INDEX)
    assert ids[0] == tokenizer.bos_token_id and labels[0] == IGNORE_INDEX
    # Labelled tokens equal their input tokens and spell exactly the two answers with their eos.
    mask = labels != IGNORE_INDEX
    assert np.array_equal(labels[mask], ids[mask])
    runs = np.split(np.flatnonzero(mask), np.flatnonzero(np.diff(np.flatnonzero(mask)) > 1) + 1)
    answers = [tokenizer.decode(ids[run]) for run in runs]
    assert answers == [" red circle</s>", " count: 1</s>"]
    # Everything that is not an answer decodes to the prompt, in order.
    prompt = tokenizer.decode(ids[~mask][1:][ids[~mask][1:] != image_id])
    assert prompt == f"{VICUNA_SYSTEM} USER: \nList the shapes. ASSISTANT:USER: How many? ASSISTANT:"
    assert ids[mask][-1] == tokenizer.eos_token_id


def test_plain_template_labels_caption_and_eos_only(tokenizer: PreTrainedTokenizerFast) -> None:
    caption = [{"from": "human", "value": "Describe the image.\n<image>"}, {"from": "gpt", "value": "a red star"}]
    out = encode_conversation(caption, tokenizer, "plain", num_visual_tokens=3, max_length=64)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    ids, labels = out["input_ids"], out["labels"]
    assert list(ids[:4]) == [tokenizer.bos_token_id] + [image_id] * 3
    assert np.all(labels[:4] == IGNORE_INDEX)
    assert tokenizer.decode(ids[4:]) == "a red star</s>"
    assert np.array_equal(labels[4:], ids[4:])


def test_too_long_is_typed_with_lengths(tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(SequenceTooLongError) as info:
        encode_conversation(TWO_TURNS, tokenizer, "vicuna_v1", num_visual_tokens=100, max_length=120)
    assert info.value.reason == "too_long" and info.value.max_length == 120 and info.value.length > 120


@pytest.mark.parametrize(
    ("conversations", "error", "reason"),
    [
        ([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "  "}], EmptyAnswerError, "empty_answer"),
        ([{"from": "gpt", "value": "hi"}, {"from": "human", "value": "x"}], ConversationError, "bad_conversation"),
        ([{"from": "human", "value": "hi"}], ConversationError, "bad_conversation"),
        ([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "<image>"}], ImageMismatchError, "image_mismatch"),
        ([], ConversationError, "bad_conversation"),
    ],
)
def test_bad_conversations_raise_with_reason(
    tokenizer: PreTrainedTokenizerFast, conversations: list, error: type, reason: str
) -> None:
    with pytest.raises(error) as info:
        encode_conversation(conversations, tokenizer, "vicuna_v1", num_visual_tokens=4, max_length=512)
    assert info.value.reason == reason


def test_plain_refuses_multi_turn(tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(ConversationError, match="plain"):
        encode_conversation(TWO_TURNS, tokenizer, "plain", num_visual_tokens=4, max_length=512)


def test_text_only_sample_has_no_image_tokens(tokenizer: PreTrainedTokenizerFast) -> None:
    out = encode_conversation(TWO_TURNS[2:], tokenizer, "vicuna_v1", num_visual_tokens=4, max_length=512)
    assert tokenizer.convert_tokens_to_ids("<image>") not in out["input_ids"]


def test_tokenizer_without_image_token_is_refused(tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(ValueError, match="<img>"):
        encode_conversation(TWO_TURNS, tokenizer, "vicuna_v1", num_visual_tokens=4, image_token="<img>")
