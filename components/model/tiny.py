"""A tiny LLaVA (CLIP vision tower + Llama LM) built from config, for tests and the demo.

Nothing can be downloaded, so the tiny model is saved as an ordinary Hugging Face
checkpoint directory (weights, tokenizer, image processor) and every later step
loads it through the same `from_pretrained` code path a real LLaVA-1.5 uses.
An optional warm-up trains the language model on plain text for a few hundred
steps, so that it stands in for a pretrained base instead of random weights.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from components.config import TinyModelSection

log = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, IMAGE_TOKEN]
# OpenAI CLIP's normalisation, as in LLaVA-1.5's processor.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Words the synthetic set and the chat templates use, so that the byte-level BPE
# learns merges for them even when no corpus is given. Any other text still
# tokenises (byte fallback), only less compactly.
_BASE_CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "USER: ASSISTANT: Describe the image. List the items in the image. How many items are there?",
    "red green blue yellow purple orange white black gray brown pink cyan",
    "circle square triangle star diamond cross ring shape shapes small medium large big tiny",
    "top bottom left right center middle corner upper lower in the on of and with a an is there are",
    "count area size number 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 . , : ;",
    "ingredients recipe nutrition mass cal fat protein carb grams g kcal",
]


def build_tokenizer(vocab_size: int, corpus: Iterable[str] = ()) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on the base corpus plus `corpus`; deterministic for the same input."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = list(_BASE_CORPUS) + list(corpus)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        model_max_length=4096,
    )


def tiny_llava_config(tiny: TinyModelSection, tokenizer: PreTrainedTokenizerFast) -> LlavaConfig:
    """LLaVA-1.5's architecture at toy sizes: CLIP ViT + 2-layer MLP projector + Llama."""
    if tiny.image_size % tiny.patch_size:
        raise ValueError(
            f"model.tiny.image_size ({tiny.image_size}) must be a multiple of model.tiny.patch_size ({tiny.patch_size})"
        )
    vision = CLIPVisionConfig(
        hidden_size=tiny.vision_hidden,
        intermediate_size=tiny.vision_hidden * 4,
        num_hidden_layers=tiny.vision_layers,
        num_attention_heads=tiny.vision_heads,
        image_size=tiny.image_size,
        patch_size=tiny.patch_size,
        projection_dim=tiny.vision_hidden,
    )
    text = LlamaConfig(
        hidden_size=tiny.text_hidden,
        intermediate_size=tiny.text_intermediate,
        num_hidden_layers=tiny.text_layers,
        num_attention_heads=tiny.text_heads,
        num_key_value_heads=tiny.text_heads,
        vocab_size=len(tokenizer),
        max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=(tiny.image_size // tiny.patch_size) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def build_processor(tiny: TinyModelSection, tokenizer: PreTrainedTokenizerFast) -> LlavaProcessor:
    """LLaVA processor (CLIP image processor + tokenizer) at the tiny image size."""
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": tiny.image_size},
        crop_size={"height": tiny.image_size, "width": tiny.image_size},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=tiny.patch_size,
        vision_feature_select_strategy="default",
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )


def build_tiny_processor(tiny: TinyModelSection, path: str | Path, corpus: Iterable[str] = ()) -> str:
    """Save the tiny model's processor (tokenizer + image processor) to `path`; returns the path."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    build_processor(tiny, build_tokenizer(tiny.vocab_size, corpus)).save_pretrained(path)
    return str(path)


def warm_up_language_model(
    model: LlavaForConditionalGeneration,
    tokenizer: PreTrainedTokenizerFast,
    texts: Sequence[str],
    steps: int,
    seed: int,
    batch_size: int = 16,
    lr: float = 3e-3,
) -> list[float]:
    """Train the LM (text only) on `texts` so the tiny base knows the vocabulary; returns the losses."""
    if steps == 0 or not texts:
        return []
    generator = torch.Generator().manual_seed(seed)
    lm = model.model.language_model
    params = [p for p in lm.parameters()] + [p for p in model.lm_head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    losses: list[float] = []
    for step in range(steps):
        idx = torch.randint(len(texts), (batch_size,), generator=generator).tolist()
        batch = tokenizer(
            [texts[i] + EOS_TOKEN for i in idx], return_tensors="pt", padding=True, truncation=True, max_length=256
        )
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(out.loss.item())
        if step % 50 == 0 or step == steps - 1:
            log.info("tiny LM warm-up step %d/%d loss %.3f", step + 1, steps, losses[-1])
    model.eval()
    return losses


def save_tiny_checkpoint(
    tiny: TinyModelSection, path: str | Path, texts: Sequence[str] = (), seed: int = 0
) -> str:
    """Build, warm up (tiny.warmup_steps on `texts`) and save a tiny LLaVA checkpoint with its processor."""
    path = Path(path)
    torch.manual_seed(seed)
    processor = build_processor(tiny, build_tokenizer(tiny.vocab_size, texts))
    model = LlavaForConditionalGeneration(tiny_llava_config(tiny, processor.tokenizer))
    warm_up_language_model(model, processor.tokenizer, list(texts), tiny.warmup_steps, seed)
    # Batched calls leave truncation/padding switched on in the fast tokenizer; never save them with it.
    processor.tokenizer.backend_tokenizer.no_truncation()
    processor.tokenizer.backend_tokenizer.no_padding()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)
