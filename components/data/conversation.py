"""Chat templates and tokenisation with labels on the assistant's tokens only.

Templates (LLaVA's, so that fine-tuning a released LLaVA-1.5 sees the prompts it was trained on):

- ``vicuna_v1``: ``SYSTEM USER: q1 ASSISTANT: a1</s>USER: q2 ASSISTANT: a2</s>`` where SYSTEM is
  Vicuna's system prompt (LLaVA's ``conv_vicuna_v1``: a space after the system prompt and
  between question and "ASSISTANT:", none after the eos).
- ``plain`` (LLaVA's stage-1 pretraining): the image placeholders, then the caption and
  eos; the rest of the human turn is dropped. Exactly one human and one gpt turn.

Labels are -100 everywhere except the assistant's answers, each with the space
after "ASSISTANT:" and its closing eos, so the model learns to answer and to stop.
The text is tokenised in one piece (no drift at segment boundaries); a token is
labelled when it starts inside an answer span, which needs a fast tokenizer's
character offsets. Each ``<image>`` placeholder (a special token of the
tokenizer) becomes exactly ``num_visual_tokens`` copies of the image token id;
the model replaces them with the projected visual features. A BOS token is
prepended when the tokenizer has one (unlabelled).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

IGNORE_INDEX = -100
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
TEMPLATES = ("vicuna_v1", "plain")


class ConversationError(ValueError):
    """A sample that cannot be encoded; `reason` is the skip-reason code the pipeline counts."""

    reason = "bad_conversation"


class EmptyAnswerError(ConversationError):
    reason = "empty_answer"


class ImageMismatchError(ConversationError):
    reason = "image_mismatch"


class SequenceTooLongError(ConversationError):
    """Longer than max_length after the image placeholders are expanded."""

    reason = "too_long"

    def __init__(self, length: int, max_length: int) -> None:
        super().__init__(f"{length} tokens after image expansion > max_length {max_length}")
        self.length = length
        self.max_length = max_length


@dataclass(frozen=True)
class Rendered:
    """A conversation as one prompt string plus the character spans that carry labels."""

    text: str
    label_spans: tuple[tuple[int, int], ...]
    num_placeholders: int


def _turns(conversations: Sequence[dict]) -> list[tuple[str, str]]:
    """(question, answer) pairs; checks roles alternate human/gpt and answers are non-empty."""
    if not isinstance(conversations, Sequence) or isinstance(conversations, str) or not conversations:
        raise ConversationError("'conversations' must be a non-empty list of {from, value} turns")
    if len(conversations) % 2:
        raise ConversationError(f"{len(conversations)} turns: expected human/gpt pairs ending with a gpt answer")
    pairs = []
    for i in range(0, len(conversations), 2):
        q, a = conversations[i], conversations[i + 1]
        for j, (turn, role) in enumerate(((q, "human"), (a, "gpt"))):
            if not isinstance(turn, dict) or turn.get("from") != role or not isinstance(turn.get("value"), str):
                raise ConversationError(f"conversations[{i + j}] must be {{'from': '{role}', 'value': str}}")
        if not a["value"].strip():
            raise EmptyAnswerError(f"conversations[{i + 1}] (gpt) is empty")
        pairs.append((q["value"], a["value"]))
    return pairs


def render(conversations: Sequence[dict], template: str, eos: str, image_token: str = "<image>") -> Rendered:
    """The prompt text of a conversation and the spans (answer + eos) that get labels."""
    pairs = _turns(conversations)
    if any(image_token in a for _, a in pairs):
        raise ImageMismatchError(f"an assistant answer contains the image placeholder {image_token!r}")
    spans: list[tuple[int, int]] = []
    if template == "plain":
        if len(pairs) != 1:
            raise ConversationError(f"the 'plain' template takes one human/gpt pair, got {len(pairs)}")
        question, answer = pairs[0]
        placeholders = question.count(image_token)
        text = image_token * placeholders
        start = len(text)
        text += answer.strip() + eos
        return Rendered(text, ((start, len(text)),), placeholders)
    if template != "vicuna_v1":
        raise ValueError(f"unknown conversation template {template!r}; known: {', '.join(TEMPLATES)}")
    text = VICUNA_SYSTEM + " "
    for question, answer in pairs:
        text += f"USER: {question} ASSISTANT:"
        start = len(text)
        text += f" {answer}{eos}"
        spans.append((start, len(text)))
    return Rendered(text, tuple(spans), sum(q.count(image_token) for q, _ in pairs))


class Encoder:
    """Tokenises rendered conversations; image placeholders become visual tokens.

    Built from a Hugging Face fast tokenizer but keeps only its Rust `tokenizers`
    backend and a few token ids, so it pickles small and unpickles without
    importing transformers or torch (cheap to ship to Ray actors).
    """

    def __init__(self, tokenizer, template: str, num_visual_tokens: int, max_length: int,
                 image_token: str = "<image>") -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("a fast (tokenizers-based) tokenizer is needed for label offsets")
        if template not in TEMPLATES:
            raise ValueError(f"unknown conversation template {template!r}; known: {', '.join(TEMPLATES)}")
        image_id = tokenizer.convert_tokens_to_ids(image_token)
        if image_id is None or image_id == tokenizer.unk_token_id or tokenizer.eos_token is None:
            raise ValueError(
                f"the tokenizer has no {image_token!r} token or no eos token; add {image_token!r} as a special "
                "token and set eos_token before preparing the model directory"
            )
        if num_visual_tokens < 1:
            raise ValueError(f"num_visual_tokens must be >= 1, got {num_visual_tokens}")
        self.backend = tokenizer.backend_tokenizer
        self.eos_token = str(tokenizer.eos_token)
        self.template = template
        self.num_visual_tokens = num_visual_tokens
        self.max_length = max_length
        self.image_token = image_token
        self.image_token_id = int(image_id)
        self.bos = [] if tokenizer.bos_token_id is None else [int(tokenizer.bos_token_id)]

    def encode_many(
        self, batch: Sequence[Sequence[dict]], templates: Sequence[str] | None = None
    ) -> list[dict[str, np.ndarray] | ConversationError]:
        """Encode a batch (one tokenizer call); each entry is the encoding or the error that skips it."""
        rendered: list[Rendered | ConversationError] = []
        for i, conversations in enumerate(batch):
            try:
                template = templates[i] if templates is not None else self.template
                rendered.append(render(conversations, template, self.eos_token, self.image_token))
            except ConversationError as exc:
                rendered.append(exc)
        texts = [r.text for r in rendered if isinstance(r, Rendered)]
        encodings = iter(self.backend.encode_batch(texts, add_special_tokens=False) if texts else [])
        out: list[dict[str, np.ndarray] | ConversationError] = []
        for r in rendered:
            if isinstance(r, ConversationError):
                out.append(r)
                continue
            enc = next(encodings)
            try:
                out.append(self._labels(r, enc.ids, enc.offsets))
            except ConversationError as exc:
                out.append(exc)
        return out

    def _labels(self, r: Rendered, ids: list[int], offsets: list[tuple[int, int]]) -> dict[str, np.ndarray]:
        tokens = np.asarray(ids, dtype=np.int64)
        is_image = tokens == self.image_token_id
        found = int(is_image.sum())
        if found != r.num_placeholders:
            raise ImageMismatchError(f"{r.num_placeholders} placeholder(s) in the text but {found} image token(s)")
        length = len(self.bos) + len(tokens) + found * (self.num_visual_tokens - 1)
        if length > self.max_length:
            raise SequenceTooLongError(length, self.max_length)
        starts = np.fromiter((start for start, _ in offsets), dtype=np.int64, count=len(offsets))
        in_answer = np.zeros(len(tokens), dtype=bool)
        for span_start, span_end in r.label_spans:
            in_answer |= (starts >= span_start) & (starts < span_end)
        labelled = np.where(in_answer & ~is_image, tokens, IGNORE_INDEX)
        if not in_answer.any():
            raise EmptyAnswerError("no assistant token left to learn from")
        repeats = np.where(is_image, self.num_visual_tokens, 1)
        bos = np.asarray(self.bos, dtype=np.int64)
        return {
            "input_ids": np.concatenate([bos, np.repeat(tokens, repeats)]),
            "labels": np.concatenate([np.full(len(bos), IGNORE_INDEX, dtype=np.int64), np.repeat(labelled, repeats)]),
        }


def encode_conversation(
    conversations: Sequence[dict],
    tokenizer,
    template: str = "vicuna_v1",
    num_visual_tokens: int = 576,
    image_token: str = "<image>",
    max_length: int = 2048,
) -> dict[str, np.ndarray]:
    """input_ids and labels (-100 outside the assistant's answers) of one conversation.

    Raises SequenceTooLongError (and other ConversationErrors, each with a `.reason`)
    for samples the pipeline must skip and count.
    """
    encoder = Encoder(tokenizer, template, num_visual_tokens, max_length, image_token)
    result = encoder.encode_many([conversations])[0]
    if isinstance(result, ConversationError):
        raise result
    return result
