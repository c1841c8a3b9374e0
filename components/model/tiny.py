"""A tiny LLaVA (CLIP vision tower + Llama LM) built from config, for tests and the demo.

Nothing can be downloaded, so the tiny model is saved as an ordinary Hugging Face
checkpoint directory (weights, tokenizer, image processor) and every later step
loads it through the same `from_pretrained` code path a real LLaVA-1.5 uses.
Optional warm-ups make it stand in for a released LLaVA-1.5 instead of random
weights: the CLIP vision tower learns, on synthetic shape images of its own, to tell
apart what a pretrained CLIP would (colour, shape, size, position, count,
background); the language model learns the vocabulary on plain text; then the
projector and the language model learn to caption the warm-up's own images through
the frozen tower (LLaVA's own training in miniature), so the base reads image tokens
before duet's stages adapt it, as a released LLaVA-1.5 does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from components.config import TinyModelSection
from components.data.conversation import IGNORE_INDEX, encode_conversation
from components.data.synthetic import (
    BACKGROUNDS,
    CAPTION_PROMPT,
    COLOURS,
    SHAPES,
    SIZES,
    TEXTURES,
    Scene,
    Shape,
    SyntheticShapes,
)

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
    image_processor = CLIPImageProcessorPil(
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


def _optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, schedule: Any,
                    params: Sequence[torch.nn.Parameter]) -> float:
    """One warm-up update (gradients clipped to norm 1); returns the loss."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    schedule.step()
    return loss.item()


def _adamw_warmup_cosine(params: Sequence[torch.nn.Parameter], lr: float, steps: int) -> tuple[Any, Any]:
    """AdamW without weight decay, a linear warm-up over 5 % of the steps, then cosine to zero."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    return optimizer, schedule


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
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
        losses.append(_optimizer_step(loss, optimizer, schedule, params))
        if step % 50 == 0 or step == steps - 1:
            log.info("tiny LM warm-up step %d/%d loss %.3f", step + 1, steps, losses[-1])
    model.eval()
    return losses


# The vision warm-up draws its own scenes under this seed (plus the run seed), far from any dataset seed,
# so the tower never sees a training, validation or test image.
VISION_WARMUP_SEED = 0x7E1E_0000
# The hidden-state indices the warm-up supervises by default: the demo's VCE anchor and reference layers.
DEFAULT_VISION_LAYERS = (-2, -8, -14, -20)
GRID = 3  # the synthetic scenes' 3 x 3 layout of shape cells
# The vision warm-up's labels: name -> (what it is read from, loss, width). A cell label is read from the
# mean of the grid cell's patches, a patch label from every patch, an image label from the mean of all
# patches (what uniform attention hands the language model). Kind and size exist only where there is a
# shape (colour class 0 is "no shape"); "items" and "occupied" are multi-hot: the (colour, kind) pairs and
# the cells present; "largest" is the numeric task's area.
LABELS: dict[str, tuple[str, str, int]] = {
    "colour": ("cell", "ce", 1 + len(COLOURS)),
    "kind": ("cell", "ce", len(SHAPES)),
    "size": ("cell", "ce", len(SIZES)),
    "area": ("cell", "mse", 1),
    "cell": ("patch", "ce", GRID * GRID),
    "count": ("image", "ce", 1 + GRID * GRID),
    "background": ("image", "ce", len(BACKGROUNDS)),
    "texture": ("image", "ce", len(TEXTURES)),
    "items": ("image", "bce", len(COLOURS) * len(SHAPES)),
    "occupied": ("image", "bce", GRID * GRID),
    "largest": ("image", "mse", 1),
}
GRANULARITIES = ("cell", "patch", "image")
AREA_SCALE = 10.0  # areas in tenths of a percent of the image, about [0, 1]
IGNORE = -100  # cross-entropy's ignore_index: no kind or size label in an empty cell


def patch_cells(image_size: int, patch_size: int) -> torch.Tensor:
    """The 3 x 3 grid cell (reading order) holding each patch's centre, for the patches in CLIP's order."""
    side = image_size // patch_size
    centres = (torch.arange(side) + 0.5) * patch_size
    band = (centres * GRID / image_size).long().clamp_max(GRID - 1)
    return (band[:, None] * GRID + band[None, :]).flatten()


def cell_pooling(cells: torch.Tensor) -> torch.Tensor:
    """[9, P] weights that average the patches of each grid cell."""
    onehot = F.one_hot(cells, GRID * GRID).T.float()
    return onehot / onehot.sum(dim=1, keepdim=True)


def scene_targets(scenes: Sequence[Scene], cells: torch.Tensor) -> dict[str, torch.Tensor]:
    """The LABELS of a batch of scenes; `cells` is patch_cells() of the tower's patch grid."""
    batch, n_cells = len(scenes), GRID * GRID
    targets = {
        "colour": torch.zeros(batch, n_cells, dtype=torch.long),
        "kind": torch.full((batch, n_cells), IGNORE, dtype=torch.long),
        "size": torch.full((batch, n_cells), IGNORE, dtype=torch.long),
        "area": torch.zeros(batch, n_cells),
        "cell": cells.expand(batch, -1),
        "count": torch.tensor([len(s.shapes) for s in scenes]),
        "background": torch.tensor([list(BACKGROUNDS).index(s.background) for s in scenes]),
        "texture": torch.tensor([TEXTURES.index(s.texture) for s in scenes]),
        "items": torch.zeros(batch, len(COLOURS) * len(SHAPES)),
        "occupied": torch.zeros(batch, n_cells),
        "largest": torch.tensor([max(shape.area_pct for shape in s.shapes) / AREA_SCALE for s in scenes]),
    }
    colours, sizes = list(COLOURS), list(SIZES)
    for i, scene in enumerate(scenes):
        for shape in scene.shapes:
            colour, kind = colours.index(shape.colour), SHAPES.index(shape.kind)
            targets["colour"][i, shape.cell] = 1 + colour
            targets["kind"][i, shape.cell] = kind
            targets["size"][i, shape.cell] = sizes.index(shape.size)
            targets["area"][i, shape.cell] = shape.area_pct / AREA_SCALE
            targets["items"][i, colour * len(SHAPES) + kind] = 1.0
            targets["occupied"][i, shape.cell] = 1.0
    return targets


def dense_scene(generator: SyntheticShapes, index: int, parts: int = 2) -> Scene:
    """Scene `index` of a warm-up stream: `parts` generator scenes' shapes merged into one image (first per cell).

    Shapes are drawn exactly as in the dataset, but each image carries about twice as many of them, so
    the tower sees more shapes per second of warm-up.
    """
    scenes = [generator.scene(parts * index + j) for j in range(parts)]
    shapes: dict[int, Shape] = {}
    for scene in scenes:
        for shape in scene.shapes:
            shapes.setdefault(shape.cell, shape)
    return dataclasses.replace(scenes[0], shapes=tuple(shapes[cell] for cell in sorted(shapes)))


def scene_pixels(generator: SyntheticShapes, scenes: Sequence[Scene]) -> torch.Tensor:
    """Rendered scenes as CLIP input (B, 3, H, W), normalised as the data pipeline does."""
    images = np.stack([np.asarray(generator.render(scene), dtype=np.float32) for scene in scenes]) / 255.0
    pixels = (images - np.asarray(CLIP_MEAN, dtype=np.float32)) / np.asarray(CLIP_STD, dtype=np.float32)
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()


def sincos_positions(side: int, dim: int, scale: float = 0.3) -> torch.Tensor:
    """Fixed 2-D sin-cos position embeddings [side * side, dim] (MAE's start for ViTs trained from scratch).

    CLIP's default init (std 0.02) leaves positions ~15x weaker than the patch content, and a tower trained
    from there on a few thousand images never learns where a patch is; at `scale` they match the content.
    """
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    ys, xs = torch.meshgrid(torch.arange(side, dtype=torch.float32), torch.arange(side, dtype=torch.float32),
                            indexing="ij")
    angles = [axis.flatten()[:, None] * omega for axis in (ys, xs)]
    table = torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], dim=1)
    return scale * torch.nn.functional.pad(table, (0, dim - table.shape[1]))


class VisionWarmupHeads(torch.nn.Module):
    """Linear read-outs of LABELS at each supervised layer; used for the warm-up only, never saved.

    Linear heads on layer-normed hidden states (what VCE reads) make the labels linearly decodable there.
    """

    def __init__(self, dim: int, num_layers: int, pooling: torch.Tensor, shape_weight: float = 1.0) -> None:
        super().__init__()
        self.shape_weight = shape_weight
        self.norm = torch.nn.LayerNorm(dim, elementwise_affine=False)
        self.register_buffer("pooling", pooling)
        self.widths = {g: [w for where, _, w in LABELS.values() if where == g] for g in GRANULARITIES}
        self.heads = torch.nn.ModuleDict({
            g: torch.nn.ModuleList(torch.nn.Linear(dim, sum(self.widths[g])) for _ in range(num_layers))
            for g in GRANULARITIES
        })

    def outputs(self, level: int, patches: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each label's logits (or estimate) from one layer's patch tokens [B, P, d]."""
        features = self.norm(patches)
        inputs = {
            "cell": torch.einsum("cp,bpd->bcd", self.pooling, features), "patch": features,
            "image": features.mean(dim=1),
        }
        out: dict[str, torch.Tensor] = {}
        for g in GRANULARITIES:
            names = [name for name, (where, _, _) in LABELS.items() if where == g]
            out |= dict(zip(names, self.heads[g][level](inputs[g]).split(self.widths[g], dim=-1)))
        return out

    def loss(self, level: int, patches: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        """The sum of every label's loss at one layer, the shape kind's weighted by `shape_weight`."""
        total = patches.new_zeros(())
        for name, out in self.outputs(level, patches).items():
            kind, target = LABELS[name][1], targets[name]
            if kind == "ce":
                weight = self.shape_weight if name == "kind" else 1.0
                total = total + weight * F.cross_entropy(out.flatten(0, -2), target.flatten(), ignore_index=IGNORE)
            elif kind == "bce":
                total = total + F.binary_cross_entropy_with_logits(out, target)
            else:
                total = total + F.mse_loss(out.squeeze(-1), target)
        return total


def warm_up_vision_tower(
    model: LlavaForConditionalGeneration,
    tiny: TinyModelSection,
    steps: int,
    seed: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    layers: Sequence[int] = DEFAULT_VISION_LAYERS,
    shape_weight: float = 1.0,
) -> list[float]:
    """Train the CLIP tower on fresh synthetic scenes to predict, per patch, its grid cell's shape; returns losses.

    Every patch token at each of `layers` (hidden-state indices, VCE's anchor and reference layers) learns the
    colour, shape, size, area and cell of the shape in its cell, and their mean the image's shape count,
    background and texture: the visual vocabulary a pretrained CLIP brings to LLaVA. The heads are discarded.
    The shape kind is the one label a small ViT learns slowly from a few thousand images (colour and size
    are nearly in the pixels), so its loss can be weighted up (`shape_weight`).
    """
    if steps == 0:
        return []
    tower = model.model.vision_tower
    side = tiny.image_size // tiny.patch_size
    with torch.no_grad():
        positions = tower.embeddings.position_embedding.weight
        positions[0].zero_()  # the CLS token
        positions[1:] = sincos_positions(side, tiny.vision_hidden)
    generator = SyntheticShapes(VISION_WARMUP_SEED + seed, tiny.image_size, stream="instruct")
    cells = patch_cells(tiny.image_size, tiny.patch_size)
    heads = VisionWarmupHeads(tiny.vision_hidden, len(layers), cell_pooling(cells), shape_weight)
    params = [*tower.parameters(), *heads.parameters()]
    optimizer, schedule = _adamw_warmup_cosine(params, lr, steps)
    tower.train()
    losses: list[float] = []
    for step in range(steps):
        scenes = [dense_scene(generator, step * batch_size + i) for i in range(batch_size)]
        targets = scene_targets(scenes, cells)
        hidden = tower(scene_pixels(generator, scenes), output_hidden_states=True).hidden_states
        loss = sum(heads.loss(level, hidden[layer][:, 1:], targets) for level, layer in enumerate(layers))
        losses.append(_optimizer_step(loss / len(layers), optimizer, schedule, params))
        if step % 50 == 0 or step == steps - 1:
            log.info("tiny vision warm-up step %d/%d loss %.3f", step + 1, steps, losses[-1])
    tower.eval()
    return losses


# The caption warm-up draws scenes of its own too: neither the vision warm-up's nor any dataset's.
CAPTION_WARMUP_SEED = 0x7E1E_0001


def caption_batch(generator: SyntheticShapes, tokenizer: PreTrainedTokenizerFast, indices: Sequence[int],
                  num_visual_tokens: int) -> dict[str, torch.Tensor]:
    """A padded batch of caption samples of `generator`'s scenes, alternately in LLaVA's pretraining
    template (`plain`: image, caption) and its chat template (question "Describe the image briefly.")."""
    scenes = [generator.scene(i) for i in indices]
    encoded = [
        encode_conversation(
            [{"from": "human", "value": f"{IMAGE_TOKEN}\n{CAPTION_PROMPT}"},
             {"from": "gpt", "value": SyntheticShapes.caption(scene)}],
            tokenizer, "plain" if i % 2 == 0 else "vicuna_v1", num_visual_tokens, IMAGE_TOKEN,
        ) for i, scene in zip(indices, scenes)
    ]
    width = max(len(e["input_ids"]) for e in encoded)
    input_ids = torch.full((len(encoded), width), int(tokenizer.pad_token_id))
    labels = torch.full((len(encoded), width), IGNORE_INDEX)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, e in enumerate(encoded):
        n = len(e["input_ids"])
        input_ids[row, :n] = torch.from_numpy(e["input_ids"])
        labels[row, :n] = torch.from_numpy(e["labels"])
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
            "pixel_values": scene_pixels(generator, scenes)}


def warm_up_captioning(
    model: LlavaForConditionalGeneration,
    tokenizer: PreTrainedTokenizerFast,
    tiny: TinyModelSection,
    steps: int,
    seed: int,
    batch_size: int = 16,
    lr: float = 1e-3,
) -> list[float]:
    """Train the projector and the LM to caption fresh synthetic scenes through the frozen tower; returns losses.

    What LLaVA-1.5's own two training stages give a released checkpoint: an LM that reads the image tokens
    (which shape has which colour, how many there are) before anyone fine-tunes it. Captions only, never
    the instruction tasks a duet run fine-tunes on, and never a dataset image.
    """
    if steps == 0:
        return []
    generator = SyntheticShapes(CAPTION_WARMUP_SEED + seed, tiny.image_size, stream="caption")
    num_visual_tokens = (tiny.image_size // tiny.patch_size) ** 2
    tower = model.model.vision_tower
    tower.requires_grad_(False)
    params = [*model.model.multi_modal_projector.parameters(), *model.model.language_model.parameters(),
              *model.lm_head.parameters()]
    optimizer, schedule = _adamw_warmup_cosine(params, lr, steps)
    model.train()
    tower.eval()  # frozen, as LLaVA keeps CLIP
    losses: list[float] = []
    for step in range(steps):
        batch = caption_batch(generator, tokenizer, range(step * batch_size, (step + 1) * batch_size),
                              num_visual_tokens)
        losses.append(_optimizer_step(model(**batch).loss, optimizer, schedule, params))
        if step % 50 == 0 or step == steps - 1:
            log.info("tiny caption warm-up step %d/%d loss %.3f", step + 1, steps, losses[-1])
    model.eval()
    tower.requires_grad_(True)
    return losses


# Written beside the weights: the digest of everything the tiny base was built from, so a base built from
# another recipe (tiny sizes, warm-up steps, texts, VCE layers or seed) is rebuilt instead of reused.
RECIPE_FILE = "duet_tiny_recipe.json"
RECIPE_VERSION = 3  # bumped when the build itself changes (2: the vision tower is warmed up; 3: captioning)


def tiny_recipe(tiny: TinyModelSection, texts: Sequence[str], seed: int, vision_layers: Sequence[int]) -> str:
    """Digest of what a tiny base is built from."""
    payload = {"version": RECIPE_VERSION, "tiny": tiny.model_dump(mode="json"), "seed": seed,
               "vision_layers": list(vision_layers), "texts": hashlib.sha256("\n".join(texts).encode()).hexdigest()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def built_recipe(path: str | Path) -> str | None:
    """The recipe digest a tiny base at `path` was built from; None when it has none (another build)."""
    try:
        return json.loads((Path(path) / RECIPE_FILE).read_text())["recipe"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save_tiny_checkpoint(
    tiny: TinyModelSection,
    path: str | Path,
    texts: Sequence[str] = (),
    seed: int = 0,
    vision_layers: Sequence[int] = DEFAULT_VISION_LAYERS,
) -> str:
    """Build, warm up (vision tower on its own scenes, LM on `texts`, then projector and LM on captions of
    scenes of their own) and save a tiny LLaVA with its processor.

    Written to a sibling folder first and moved into place, so a reader never sees half a checkpoint and a
    base built from another recipe is replaced whole.
    """
    path = Path(path)
    torch.manual_seed(seed)
    processor = build_processor(tiny, build_tokenizer(tiny.vocab_size, texts))
    model = LlavaForConditionalGeneration(tiny_llava_config(tiny, processor.tokenizer))
    warm_up_vision_tower(model, tiny, tiny.vision_warmup_steps, seed, batch_size=tiny.vision_warmup_batch,
                         lr=tiny.vision_warmup_lr, layers=vision_layers, shape_weight=tiny.vision_warmup_shape_weight)
    warm_up_language_model(model, processor.tokenizer, list(texts), tiny.warmup_steps, seed)
    warm_up_captioning(model, processor.tokenizer, tiny, tiny.caption_warmup_steps, seed,
                       batch_size=tiny.caption_warmup_batch, lr=tiny.caption_warmup_lr)
    # Batched calls leave truncation/padding switched on in the fast tokenizer; never save them with it.
    processor.tokenizer.backend_tokenizer.no_truncation()
    processor.tokenizer.backend_tokenizer.no_padding()
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.building-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    processor.save_pretrained(staging)
    (staging / RECIPE_FILE).write_text(json.dumps({"recipe": tiny_recipe(tiny, texts, seed, vision_layers)}) + "\n")
    replaced = path.with_name(f".{path.name}.replaced-{os.getpid()}")
    if path.exists():
        path.rename(replaced)
    staging.rename(path)
    shutil.rmtree(replaced, ignore_errors=True)
    return str(path)
