"""Prompts as the model saw them in training: the template up to where the answer starts, the visual
tokens expanded, images CLIP-sized (or blanked, for the blind baseline)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
from tokenizers import Tokenizer
from transformers import LlavaConfig

from components import storage
from components.config import DuetConfig
from components.data.conversation import (
    ConversationError,
    Encoder,
    ImageMismatchError,
    SequenceTooLongError,
    render,
)
from components.data.dataset import load_tokenizer, local_processor_dir
from components.data.transform import ImageSpec, image_pixels, load_image_spec

IMAGE_TOKEN = "<image>"


# Stands in for the answer when rendering a prompt: the answer's span only marks where the prompt ends.
_ANSWER_STUB = "."


def split_reference(conversations: Sequence[dict]) -> tuple[list[dict], str]:
    """The turns up to the last human turn, and the answer that follows it ("" when the turns end there)."""
    turns = list(conversations)
    if turns and isinstance(turns[-1], dict) and turns[-1].get("from") == "gpt":
        return turns[:-1], str(turns[-1].get("value", ""))
    return turns, ""


def generation_prompt(turns: Sequence[dict], template: str, eos: str, image_token: str = IMAGE_TOKEN) -> str:
    """The rendering of `turns` (ending with a human turn) up to where the assistant's answer starts.

    It is the training text's prefix exactly (components.data.conversation.render), so the model is
    asked in the form it was trained on.
    """
    if not turns or not isinstance(turns[-1], dict) or turns[-1].get("from") != "human":
        raise ConversationError("a prompt must end with a human turn ({'from': 'human', 'value': ...})")
    rendered = render([*turns, {"from": "gpt", "value": _ANSWER_STUB}], template, eos, image_token)
    return rendered.text[: rendered.label_spans[-1][0]]


def question_text(turns: Sequence[dict], image_token: str = IMAGE_TOKEN) -> str:
    """The last human turn without its image placeholders, for the per-sample table."""
    return str(turns[-1].get("value", "")).replace(image_token, "").strip() if turns else ""


class PromptBuilder:
    """Prompts as the model saw them in training: template, visual-token expansion, CLIP-sized images."""

    def __init__(self, tokenizer: Any, template: str, caption_template: str, num_visual_tokens: int,
                 max_length: int, spec: ImageSpec, max_pixels: int) -> None:
        # The data plane's encoder validates the tokenizer and knows the image token id and BOS.
        self.encoder = Encoder(tokenizer, template, num_visual_tokens, max_length, IMAGE_TOKEN)
        self.tokenizer = tokenizer
        # A saved tokenizer may carry truncation/padding settings (tokenizer.json); a prompt is never cut or
        # padded here: too long is refused (SequenceTooLongError) and padding happens at generation.
        self.backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self.backend.no_truncation()
        self.backend.no_padding()
        self.template = template
        self.caption_template = caption_template
        self.num_visual_tokens = num_visual_tokens
        self.max_length = max_length
        self.spec = spec
        self.max_pixels = max_pixels

    @classmethod
    def from_config(cls, cfg: DuetConfig, processor_dir: str, num_visual_tokens: int) -> PromptBuilder:
        local = local_processor_dir(processor_dir, cfg.storage)
        return cls(
            load_tokenizer(local), cfg.data.conversation_template, cfg.data.caption_template, num_visual_tokens,
            cfg.model.max_length, load_image_spec(local), cfg.data.max_image_pixels,
        )

    def template_for(self, task: str | None) -> str:
        """The template the training data used for this task (captions: data.caption_template)."""
        return self.caption_template if task == "caption" else self.template

    def text(self, turns: Sequence[dict], task: str | None = None) -> str:
        return generation_prompt(turns, self.template_for(task), self.tokenizer.eos_token)

    def encode(self, text: str, num_images: int) -> np.ndarray:
        """Token ids of a prompt text: BOS, then each image token repeated num_visual_tokens times."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        image_id = self.encoder.image_token_id
        found = ids.count(image_id)
        if found != num_images:
            raise ImageMismatchError(f"{found} '{IMAGE_TOKEN}' placeholder(s) in the prompt but {num_images} image(s)")
        length = len(self.encoder.bos) + len(ids) + found * (self.num_visual_tokens - 1)
        if length > self.max_length:
            raise SequenceTooLongError(length, self.max_length)
        out = list(self.encoder.bos)
        for token in ids:
            out.extend([token] * self.num_visual_tokens if token == image_id else [token])
        return np.asarray(out, dtype=np.int64)

    def images(self, encoded: Sequence[bytes], blank: bool = False) -> np.ndarray:
        """Decoded, padded-to-square, resized and cropped RGB images: uint8 (n, H, W, 3).

        `blank`: each image is still decoded and checked (the same samples are asked), then replaced
        by a blank one of the same size, the processor's mean colour (all zeros once normalised).
        """
        height, width = self.spec.output_hw
        if not encoded:
            return np.zeros((0, height, width, 3), dtype=np.uint8)
        pixels = np.stack([image_pixels(data, self.spec, self.max_pixels) for data in encoded])
        if blank:
            pixels[:] = np.round(np.asarray(self.spec.mean) * 255).astype(np.uint8)
        return pixels


def visual_token_count(cfg: DuetConfig) -> int:
    """Visual tokens per image, from the base checkpoint's config.json (no weights are read)."""
    if not cfg.model.checkpoint:
        raise ValueError("model.checkpoint is not set: evaluation needs the base checkpoint (path or URI)")
    uri = storage.join(cfg.model.checkpoint, "config.json")
    try:
        config = LlavaConfig.from_dict(json.loads(storage.read_text(uri, cfg.storage)))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{uri} not found: model.checkpoint must be a LlavaForConditionalGeneration checkpoint directory"
        ) from None
    side = config.vision_config.image_size // config.vision_config.patch_size
    return side * side + (1 if config.vision_feature_select_strategy == "full" else 0)


def image_digest(images: np.ndarray) -> str:
    """A short digest of the pixels a sample is asked with ("" without images): what the model really saw."""
    return hashlib.sha256(images.tobytes()).hexdigest()[:16] if len(images) else ""
