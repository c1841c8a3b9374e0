"""The tiny LLaVA factory: a real HF checkpoint directory, loadable like any LLaVA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from components.config import TinyModelSection
from components.data.synthetic import SyntheticShapes
from components.model.tiny import (
    IMAGE_TOKEN,
    build_tokenizer,
    built_recipe,
    caption_batch,
    save_tiny_checkpoint,
    scene_pixels,
    tiny_llava_config,
    tiny_recipe,
    warm_up_captioning,
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


def test_caption_warm_up_trains_projector_and_lm_and_leaves_the_tower_as_it_was() -> None:
    tiny = TinyModelSection(vision_layers=2, image_size=32, patch_size=8)
    tokenizer = build_tokenizer(512, TEXTS)
    model = LlavaForConditionalGeneration(tiny_llava_config(tiny, tokenizer))
    tower = {k: v.clone() for k, v in model.model.vision_tower.state_dict().items()}
    projector = {k: v.clone() for k, v in model.model.multi_modal_projector.state_dict().items()}
    losses = warm_up_captioning(model, tokenizer, tiny, steps=30, seed=0, batch_size=4, lr=3e-3)
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < losses[0] - 1.0, losses
    assert all(torch.equal(v, model.model.vision_tower.state_dict()[k]) for k, v in tower.items()), "CLIP stays frozen"
    assert any(not torch.equal(v, model.model.multi_modal_projector.state_dict()[k]) for k, v in projector.items())
    assert all(p.requires_grad for p in model.model.vision_tower.parameters()), "later stages decide what trains"


def test_caption_samples_alternate_llava_pretraining_and_chat_templates() -> None:
    tokenizer = build_tokenizer(512, TEXTS)
    generator = SyntheticShapes(7, 32, stream="caption")
    batch = caption_batch(generator, tokenizer, [0, 1], num_visual_tokens=16)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    for row, index in enumerate([0, 1]):
        ids, labels = batch["input_ids"][row], batch["labels"][row]
        real = batch["attention_mask"][row].bool()
        assert int((ids == image_id).sum()) == 16
        answer = tokenizer.decode(ids[real & (labels != -100)], skip_special_tokens=True).strip()
        assert answer == SyntheticShapes.caption(generator.scene(index))
    plain, chat = (tokenizer.decode(ids) for ids in batch["input_ids"])
    assert "USER:" not in plain and "USER:" in chat and "ASSISTANT:" in chat
    assert batch["pixel_values"].shape == (2, 3, 32, 32)


@pytest.mark.slow
def test_a_caption_warmed_base_names_the_colours_of_held_out_scenes(tmp_path: Path) -> None:
    """The base stands in for a released LLaVA-1.5: it reads image tokens before any duet stage. Held-out
    scenes (a seed neither warm-up draws from), greedy captions, the first shape's colour named: chance is
    1/6; measured 0.74 at the demo's sizes after 300 steps on a random tower, 0.91 on a tower warmed up as the demo's."""
    tiny = TinyModelSection(warmup_steps=0, caption_warmup_steps=300)
    path = save_tiny_checkpoint(tiny, tmp_path / "base", TEXTS, seed=0)
    model = LlavaForConditionalGeneration.from_pretrained(path).eval()
    tokenizer = AutoProcessor.from_pretrained(path).tokenizer
    generator = SyntheticShapes(4242, tiny.image_size, stream="caption")
    scenes = [generator.scene(i) for i in range(96)]
    tokens = (tiny.image_size // tiny.patch_size) ** 2
    prompt = torch.tensor([[tokenizer.bos_token_id] + [model.config.image_token_id] * tokens] * len(scenes))
    with torch.no_grad():
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                             pixel_values=scene_pixels(generator, scenes), max_new_tokens=6, do_sample=False)
    named = [scene.shapes[0].colour in tokenizer.decode(row[prompt.shape[1]:], skip_special_tokens=True).split()[:3]
             for scene, row in zip(scenes, out)]
    accuracy = sum(named) / len(named)
    print({"first_colour_accuracy": accuracy})
    assert accuracy >= 0.5, accuracy
