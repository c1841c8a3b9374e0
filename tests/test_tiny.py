"""The tiny LLaVA factory: a real HF checkpoint directory, loadable like any LLaVA."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoProcessor, LlavaForConditionalGeneration

from components.config import TinyModelSection
from components.model.tiny import (
    IMAGE_TOKEN,
    build_tokenizer,
    save_tiny_checkpoint,
    tiny_llava_config,
    warm_up_language_model,
)

TEXTS = ["a large red circle in the top left and a small blue square at the bottom"] * 8 + [
    "count: 3, area: 12.5", "red circle, blue square, green star",
]


def test_checkpoint_loads_through_from_pretrained(tmp_path: Path) -> None:
    tiny = TinyModelSection(warmup_steps=3)
    path = save_tiny_checkpoint(tiny, tmp_path / "tiny", TEXTS, seed=0)
    model = LlavaForConditionalGeneration.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    assert model.config.image_token_id == processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert model.config.image_seq_length == (tiny.image_size // tiny.patch_size) ** 2
    assert model.config.vision_config.num_hidden_layers == tiny.vision_layers
    saved = json.loads((Path(path) / "tokenizer.json").read_text())
    assert saved["truncation"] is None and saved["padding"] is None, "warm-up settings must not be saved"


def test_tokenizer_is_deterministic_and_keeps_the_image_token_whole() -> None:
    first, second = build_tokenizer(512, TEXTS), build_tokenizer(512, TEXTS)
    text = f"USER: {IMAGE_TOKEN}\nList the shapes. ASSISTANT: red circle"
    assert first(text).input_ids == second(text).input_ids
    assert first(text).input_ids.count(first.convert_tokens_to_ids(IMAGE_TOKEN)) == 1
    assert first.decode(first(text).input_ids) == text


def test_warm_up_lowers_the_language_model_loss() -> None:
    tokenizer = build_tokenizer(512, TEXTS)
    model = LlavaForConditionalGeneration(tiny_llava_config(TinyModelSection(), tokenizer))
    losses = warm_up_language_model(model, tokenizer, TEXTS, steps=30, seed=0, batch_size=4)
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < losses[0] - 1.0
