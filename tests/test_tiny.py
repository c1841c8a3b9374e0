"""The tiny LLaVA factory: a real HF checkpoint directory, loadable like any LLaVA."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoProcessor, LlavaForConditionalGeneration

from components.config import TinyModelSection
from components.model.tiny import (
    IMAGE_TOKEN,
    build_tokenizer,
    built_recipe,
    save_tiny_checkpoint,
    tiny_llava_config,
    tiny_recipe,
    warm_up_language_model,
    warm_up_vision_tower,
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


def test_a_base_records_its_recipe_and_a_rebuild_replaces_it_whole(tmp_path: Path) -> None:
    tiny = TinyModelSection(warmup_steps=0)
    path = save_tiny_checkpoint(tiny, tmp_path / "tiny", TEXTS, seed=0)
    assert built_recipe(path) == tiny_recipe(tiny, TEXTS, 0, (-2, -8, -14, -20))
    for changed in (tiny_recipe(tiny.model_copy(update={"vision_warmup_steps": 5}), TEXTS, 0, (-2, -8, -14, -20)),
                    tiny_recipe(tiny, TEXTS[:-1], 0, (-2, -8, -14, -20)),
                    tiny_recipe(tiny, TEXTS, 1, (-2, -8, -14, -20)),
                    tiny_recipe(tiny, TEXTS, 0, (-2, -8))):
        assert changed != built_recipe(path)
    (Path(path) / "stale.txt").write_text("left by the old build")
    save_tiny_checkpoint(tiny, path, TEXTS, seed=1)
    assert built_recipe(path) == tiny_recipe(tiny, TEXTS, 1, (-2, -8, -14, -20))
    assert not (Path(path) / "stale.txt").exists(), "the old base is replaced, not overlaid"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"], "no staging folder left behind"
    assert built_recipe(tmp_path / "missing") is None


def test_vision_warm_up_lowers_its_loss_and_leaves_the_tower_in_eval_mode() -> None:
    tiny = TinyModelSection(vision_layers=4)
    model = LlavaForConditionalGeneration(tiny_llava_config(tiny, build_tokenizer(512, TEXTS)))
    losses = warm_up_vision_tower(model, tiny, steps=40, seed=0, batch_size=8, lr=3e-3, layers=(-1, -3))
    assert len(losses) == 40 and sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5, losses
    assert not model.model.vision_tower.training
