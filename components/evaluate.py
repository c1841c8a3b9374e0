"""Evaluation by greedy batch generation on Ray Data, scored with the paper's task metrics (section 4.2).

::

    manifest's shards --read_webdataset (filesystem from storage.resolve, raw bytes, manifest order kept)
      -> prompt stage (tasks): parse the row; the prompt is the conversation up to its last human
         turn rendered in the training template (ending where the answer starts, e.g. "ASSISTANT:"),
         tokenised with every <image> expanded to the model's visual tokens; images decoded and
         CLIP-resized (uint8, normalised later next to the model)
      -> generation stage (actor pool of eval.num_replicas, a GPU each when GPUs are used): one model
         replica per actor, left-padded batches of eval.batch_size, greedy model.generate
      -> driver: per task, components.metrics; a per-sample table

The model is a stage artifact URI (stage 1: VCE + projector trained on captions, no adapter, i.e.
the zero-shot baseline before instruction tuning; stage 2: the fine-tuned model) or None for the
bare base checkpoint (its own projector, no VCE).

Task -> metric family (``TASK_FAMILY``): ``items`` -> item-set IoU/F1; ``description``, ``caption``,
``chat`` -> SacreBLEU/ROUGE-L; ``numeric`` -> pMAE per field and averaged; ``pope``/``yes_no`` ->
accuracy, precision, recall, F1; ``seed`` -> accuracy; ``mmbench``/``multiple_choice`` -> circular
accuracy. Task names components.metrics knows (ingredients, recipe, nutrition, ...) keep their own
family; any other task is scored as free text against its reference answer. Metrics are named
``{task}/{metric}`` (``items/iou``, ``description/rouge_l``, ``numeric/pmae``, ``numeric/pmae_area``)
plus ``score`` = ``components.metrics.primary_score`` over them.

Nothing about one sample stops an evaluation. Rows that cannot be asked (corrupt image, malformed
JSON, a prompt longer than model.max_length) or scored (a reference the metrics cannot read) are
skipped and counted by reason (``counts["skipped/<reason>"]``). Predictions are never skipped: an
unparseable answer scores as wrong and is counted (``counts["<task>/unparseable"]``).

Determinism: the dataset keeps manifest order (``preserve_order``), so each batch holds the same
samples whatever the number of replicas, and greedy decoding then gives the same predictions with
one replica or several on the same hardware.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import ray
import torch
from tokenizers import Tokenizer
from transformers import GenerationConfig, LlavaConfig

from components import metrics as task_metrics
from components import storage
from components.config import ConfigError, PipelineConfig, config_from_dict
from components.data.conversation import (
    ConversationError,
    Encoder,
    ImageMismatchError,
    SequenceTooLongError,
    render,
)
from components.data.pipeline import load_tokenizer, local_processor_dir
from components.data.records import BadRecord, parse_row
from components.data.shards import Manifest, read_manifest, shard_uris
from components.data.transform import ImageSpec, image_pixels, load_image_spec, normalize
from components.model.mllm import check_compatible, load_base_model, load_stage_model

log = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
# Stands in for the answer when rendering a prompt: the answer's span only marks where the prompt ends.
_ANSWER_STUB = "."
PROMPT_BATCH_SIZE = 64

TASK_FAMILY = {
    "items": "set", "description": "text", "caption": "text", "chat": "text", "numeric": "numeric",
    "pope": "pope", "yes_no": "pope", "seed": "seed", "mmbench": "mmbench", "multiple_choice": "mmbench",
}
# Per-family entries of components.metrics that are counts, not quality metrics.
_COUNT_NAMES = ("n", "unparseable", "missing_fields")
# Columns that travel from the prompt stage through generation to the driver.
TEXT_COLUMNS = ("key", "id", "task", "question", "prompt", "reference", "answer_fields", "image_digest", "skip",
                "skip_detail")
TABLE_COLUMNS = (
    "key", "id", "task", "family", "question", "prompt", "prediction", "reference", "parsed", "correct",
    "score", "sample_metrics", "image_digest", "skipped", "skip_detail",
)


# ---------------------------------------------------------------- prompts


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
    def from_config(cls, cfg: PipelineConfig, processor_dir: str, num_visual_tokens: int) -> PromptBuilder:
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


def visual_token_count(cfg: PipelineConfig) -> int:
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


# ---------------------------------------------------------------- the model replica


def inference_dtype(cfg: PipelineConfig, device: torch.device) -> torch.dtype:
    """fp32 on CPU; on GPUs the training precision (auto: bf16 where the GPU has it, else fp16)."""
    if device.type != "cuda":
        return torch.float32
    precision = cfg.deepspeed.precision
    if precision == "fp32":
        return torch.float32
    if precision == "fp16":
        return torch.float16
    if precision == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def load_model(cfg: PipelineConfig, model_source: str | None, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The bare base checkpoint (model_source None) or a stage artifact's model, in eval mode."""
    model = load_base_model(cfg, dtype) if model_source is None else load_stage_model(cfg, model_source, dtype)
    return model.eval()


class Generator:
    """One model replica answering encoded prompts greedily, in left-padded batches."""

    def __init__(self, cfg: PipelineConfig, model_source: str | None, processor_dir: str,
                 device: str | torch.device | None = None) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = inference_dtype(cfg, self.device)
        self.model = load_model(cfg, model_source, self.dtype).to(self.device)
        local = local_processor_dir(processor_dir, cfg.storage)
        self.tokenizer = load_tokenizer(local)
        self.spec = load_image_spec(local)

    @torch.inference_mode()
    def generate(self, prompts: Sequence[np.ndarray], images: Sequence[np.ndarray], max_new_tokens: int) -> list[str]:
        """Greedy answers; prompts are token ids (PromptBuilder.encode), images uint8 (n_i, H, W, 3) per prompt."""
        if len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} prompts but {len(images)} image arrays: one (possibly empty) per prompt")
        if not prompts:
            return []
        pad = int(self.tokenizer.pad_token_id)
        length = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), length), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), length), dtype=torch.long)
        for row, ids in enumerate(prompts):
            input_ids[row, length - len(ids):] = torch.as_tensor(np.asarray(ids, dtype=np.int64))
            mask[row, length - len(ids):] = 1
        inputs: dict[str, torch.Tensor] = {"input_ids": input_ids.to(self.device), "attention_mask": mask.to(self.device)}
        arrays = [np.asarray(a, dtype=np.uint8) for a in images if len(a)]
        if arrays:
            pixels = normalize(np.concatenate(arrays), self.spec)
            inputs["pixel_values"] = torch.from_numpy(pixels).to(self.device, self.dtype)
        settings = GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad,
            eos_token_id=self.tokenizer.eos_token_id, bos_token_id=self.tokenizer.bos_token_id,
        )
        output = self.model.generate(**inputs, generation_config=settings)
        return [text.strip() for text in self.tokenizer.batch_decode(output[:, length:], skip_special_tokens=True)]


# ---------------------------------------------------------------- Ray Data stages


def _ragged(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """One array per row as an object array (Ray stores it as a variable-shaped tensor column)."""
    out = np.empty(len(arrays), dtype=object)
    for i, array in enumerate(arrays):
        out[i] = array
    return out


def image_digest(images: np.ndarray) -> str:
    """A short digest of the pixels a sample is asked with ("" without images): what the model really saw."""
    return hashlib.sha256(images.tobytes()).hexdigest()[:16] if len(images) else ""


def _prompt_row(
    row: dict[str, Any], builder: PromptBuilder, blind: bool = False
) -> tuple[dict[str, str], np.ndarray, np.ndarray]:
    """Text columns, prompt ids and images of one raw row; a row that cannot be asked carries its skip reason."""
    height, width = builder.spec.output_hw
    no_ids, no_images = np.zeros(0, dtype=np.int64), np.zeros((0, height, width, 3), dtype=np.uint8)
    key = str(row.get("__key__", ""))
    text = dict.fromkeys(TEXT_COLUMNS, "")
    text.update(key=key, id=key)
    try:
        sample = parse_row(row)
        meta = sample.meta
        text.update(id=str(meta.get("id", key)), task=str(meta.get("task", "chat")))
        text["answer_fields"] = json.dumps(meta.get("answer_fields") or {}, sort_keys=True)
        turns, text["reference"] = split_reference(sample.conversations)
        text["question"] = question_text(turns)
        text["prompt"] = builder.text(turns, text["task"])
        ids = builder.encode(text["prompt"], len(sample.images))
        images = builder.images(sample.images, blank=blind)
    except (BadRecord, ConversationError) as exc:
        text.update(skip=exc.reason, skip_detail=str(exc))
        return text, no_ids, no_images
    text["image_digest"] = image_digest(images)
    return text, ids, images


def prompt_batch(batch: pd.DataFrame, builder: PromptBuilder, blind: bool = False) -> dict[str, np.ndarray]:
    """Ray Data stage: raw WebDataset rows -> text columns, `input_ids` and `images` per row (blank if `blind`)."""
    texts, ids, images = [], [], []
    for row in batch.to_dict("records"):
        text, row_ids, row_images = _prompt_row(row, builder, blind)
        texts.append(text)
        ids.append(row_ids)
        images.append(row_images)
    out = {name: np.asarray([t[name] for t in texts], dtype=object) for name in TEXT_COLUMNS}
    out["input_ids"] = _ragged(ids)
    out["images"] = _ragged(images)
    return out


class GenerateStage:
    """Ray Data actor: holds one model replica and adds a `prediction` column to each batch."""

    def __init__(self, config: dict[str, Any], model_source: str | None, processor_dir: str,
                 max_new_tokens: int, batch_size: int, device: str) -> None:
        self.generator = Generator(config_from_dict(config), model_source, processor_dir, device)
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        predictions = [""] * len(batch["key"])
        todo = [i for i, skip in enumerate(batch["skip"]) if not skip]
        for start in range(0, len(todo), self.batch_size):
            rows = todo[start:start + self.batch_size]
            answers = self.generator.generate(
                [batch["input_ids"][i] for i in rows], [batch["images"][i] for i in rows], self.max_new_tokens
            )
            for i, answer in zip(rows, answers):
                predictions[i] = answer
        out = {name: np.asarray(batch[name], dtype=object) for name in TEXT_COLUMNS}
        out["prediction"] = np.asarray(predictions, dtype=object)
        return out


def _shards_needed(split_uri: str, manifest: Manifest, limit: int | None) -> list[str]:
    """The manifest's first shards that hold the first `limit` records (all shards when no limit)."""
    uris, total = [], 0
    for uri, shard in zip(shard_uris(split_uri, manifest), manifest.shards):
        if limit is not None and total >= limit:
            break
        uris.append(uri)
        total += shard.count
    return uris


def use_gpu(cfg: PipelineConfig) -> bool:
    """eval.use_gpu, where `auto` means: the Ray cluster (or, before Ray starts, this machine) has GPUs."""
    if cfg.eval.use_gpu != "auto":
        return bool(cfg.eval.use_gpu)
    if ray.is_initialized():
        return ray.cluster_resources().get("GPU", 0) > 0
    return torch.cuda.is_available()


def generation_dataset(
    cfg: PipelineConfig, model_source: str | None, split_uri: str, processor_dir: str, blind: bool = False
) -> ray.data.Dataset:
    """The lazy dataset of one row per evaluated sample with its `prediction` (stages in the module docstring).

    `blind`: every image is replaced by a blank one of the same size (the blind baseline).
    """
    manifest = read_manifest(split_uri, cfg.storage)
    limit = cfg.eval.max_samples
    fs, _ = storage.resolve(split_uri, cfg.storage)
    paths = [storage.resolve(uri, cfg.storage)[1] for uri in _shards_needed(split_uri, manifest, limit)]
    builder = PromptBuilder.from_config(cfg, processor_dir, visual_token_count(cfg))
    dataset = ray.data.read_webdataset(paths, filesystem=fs, decoder=None, num_cpus=cfg.data.preprocess_num_cpus)
    dataset.context.execution_options.preserve_order = True
    if limit is not None:
        dataset = dataset.limit(limit)
    dataset = dataset.map_batches(
        prompt_batch, fn_kwargs={"builder": builder, "blind": blind}, batch_format="pandas",
        batch_size=PROMPT_BATCH_SIZE,
        num_cpus=cfg.data.preprocess_num_cpus,
    )
    gpu = use_gpu(cfg)
    return dataset.map_batches(
        GenerateStage,
        fn_constructor_kwargs={
            "config": cfg.model_dump(mode="json"), "model_source": model_source, "processor_dir": processor_dir,
            "max_new_tokens": cfg.eval.max_new_tokens, "batch_size": cfg.eval.batch_size,
            "device": "cuda" if gpu else "cpu",
        },
        batch_format="numpy", batch_size=cfg.eval.batch_size,
        compute=ray.data.ActorPoolStrategy(size=cfg.eval.num_replicas),
        num_cpus=cfg.eval.cpus_per_replica, num_gpus=cfg.eval.gpus_per_replica if gpu else 0,
    )


# ---------------------------------------------------------------- scoring


def task_family(task: str) -> str:
    """The components.metrics family that scores a task (free text for tasks it does not know)."""
    if task in TASK_FAMILY:
        return TASK_FAMILY[task]
    return task if task in task_metrics.TASK_FAMILIES else "text"


def reference_for(family: str, answer_fields: Mapping[str, Any], answer: str) -> Any:
    """The ground truth in the form the family's metric takes: structured fields first, else the answer text."""
    if family == "set":
        items = answer_fields.get("items")
        return items if isinstance(items, list) and items else answer
    if family == "numeric":
        values = {k: v for k, v in answer_fields.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        return values or answer
    if family in ("pope", "seed"):
        return str(answer_fields.get("answer") or answer)
    if family == "mmbench":
        return dict(answer_fields)
    return str(answer_fields.get("reference") or answer_fields.get("caption") or answer)


@dataclass
class EvalResult:
    """Metrics (``{task}/{metric}`` and ``score``), one table row per sample, and counts."""

    metrics: dict[str, float]
    per_sample: pd.DataFrame
    counts: dict[str, int] = field(default_factory=dict)


def _score_one(family: str, prediction: str, reference: Any) -> dict[str, float]:
    return task_metrics.score_task_family(family, [prediction], [reference])


def score_rows(rows: pd.DataFrame) -> EvalResult:
    """Score generated rows (columns TEXT_COLUMNS + prediction): per-sample fields, per-task metrics, counts."""
    missing = [c for c in (*TEXT_COLUMNS, "prediction") if c not in rows.columns]
    if missing:
        raise ValueError(f"rows to score lack the columns {missing}; they come from generation_dataset")
    table = rows.sort_values("key", kind="stable").reset_index(drop=True).copy()
    table["family"] = [task_family(t) if not s else "" for t, s in zip(table["task"], table["skip"])]
    references: list[Any] = [None] * len(table)
    parsed: list[bool | None] = [None] * len(table)
    scores: list[float] = [math.nan] * len(table)
    details: list[str] = [""] * len(table)
    skipped = list(table["skip"])
    for i, row in enumerate(table.itertuples(index=False)):
        if skipped[i]:
            continue
        fields = json.loads(row.answer_fields or "{}")
        references[i] = reference_for(row.family, fields, row.reference)
        try:
            sample = _score_one(row.family, row.prediction, references[i])
        except ValueError as exc:  # predictions never raise: the reference is unreadable
            skipped[i] = "bad_reference"
            table.at[i, "skip_detail"] = str(exc)
            continue
        parsed[i] = sample.get("unparseable", 0.0) == 0
        scores[i] = task_metrics.primary_score(sample)
        details[i] = json.dumps({k: round(v, 4) for k, v in sample.items() if k not in _COUNT_NAMES})
    table["skipped"] = skipped
    table["parsed"] = parsed
    table["score"] = scores
    table["correct"] = [None if math.isnan(s) else bool(s >= 100.0 - 1e-9) for s in scores]
    table["sample_metrics"] = details

    metrics: dict[str, float] = {}
    counts: Counter[str] = Counter(samples=len(table))
    for reason in skipped:
        if reason:
            counts["skipped"] += 1
            counts[f"skipped/{reason}"] += 1
    kept = [i for i in range(len(table)) if not skipped[i]]
    counts["evaluated"] = len(kept)
    for task in sorted({table.at[i, "task"] for i in kept}):
        index = [i for i in kept if table.at[i, "task"] == task]
        family = table.at[index[0], "family"]
        result = task_metrics.score_task_family(
            family, [table.at[i, "prediction"] for i in index], [references[i] for i in index]
        )
        for name, value in result.items():
            if name in _COUNT_NAMES:
                counts[f"{task}/{name}"] = int(value)
            else:
                metrics[f"{task}/{name}"] = float(value)
        counts["unparseable"] += int(result.get("unparseable", 0))
    if not metrics:
        raise RuntimeError(f"no sample could be evaluated: {dict(counts)} (see the per-sample skip reasons)")
    metrics["score"] = task_metrics.primary_score(metrics)
    return EvalResult(metrics=metrics, per_sample=table[list(TABLE_COLUMNS)], counts=dict(counts))


# ---------------------------------------------------------------- entry point and reporting


def check_model_source(cfg: PipelineConfig, model_source: str | None) -> None:
    """Fail on the driver, naming the difference, before any replica loads a mismatched artifact."""
    if model_source is not None:
        check_compatible(cfg, model_source)


def evaluate(
    cfg: PipelineConfig, model_source: str | None, split_uri: str, processor_dir: str, blind: bool = False,
    progress: Callable[[int], None] | None = None,
) -> EvalResult:
    """Generate an answer for every sample of a prepared split (up to eval.max_samples) and score them.

    `model_source`: a stage artifact URI, or None for the bare base checkpoint. `processor_dir`: the
    directory (or URI) with the tokenizer and image processor, usually the base checkpoint. `blind`:
    every image blanked (the blind baseline). `progress` hears the number of samples answered so far.
    """
    check_model_source(cfg, model_source)
    parts = []
    for batch in generation_dataset(cfg, model_source, split_uri, processor_dir, blind).iter_batches(
        batch_format="pandas", batch_size=None
    ):
        parts.append(batch)
        if progress is not None:
            progress(sum(len(p) for p in parts))
    rows = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=[*TEXT_COLUMNS, "prediction"])
    result = score_rows(rows)
    log.info("evaluated %s on %s: %s", model_source or "the base model", split_uri, result.counts)
    return result


def _format(value: float | int | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


# The difference columns of a zero-shot / fine-tuned / blind comparison: (column, minuend, subtrahend).
DIFFERENCES = (("change", "fine-tuned", "zero-shot"), ("from vision", "fine-tuned", "blind"))


def comparison_table(
    results: Mapping[str, EvalResult], differences: Sequence[tuple[str, str, str]] | None = None
) -> str:
    """Metrics and counts of several evaluations side by side, plus difference columns.

    `differences` lists (column, minuend, subtrahend) by result name, e.g. ("from vision",
    "fine-tuned", "blind"); with two results and none given, "change" is the second minus the first.
    """
    if not results:
        raise ValueError("comparison_table needs at least one result")
    names = list(results)
    if differences is None:
        differences = [("change", names[1], names[0])] if len(names) == 2 else []
    differences = [d for d in differences if d[1] in results and d[2] in results]
    metric_names = sorted({k for r in results.values() for k in r.metrics if k != "score"}) + ["score"]
    count_names = ["samples", "evaluated", "skipped", "unparseable"]
    header = ["metric", *names, *(label for label, _, _ in differences)]
    lines: list[list[str]] = []
    for name in metric_names:
        values = {n: results[n].metrics.get(name) for n in names}
        label = name + (" (lower is better)" if name.rsplit("/", 1)[-1].startswith("pmae") else "")
        deltas = [f"{values[a] - values[b]:+.2f}" if values[a] is not None and values[b] is not None else "-"
                  for _, a, b in differences]
        lines.append([label, *(_format(values[n]) for n in names), *deltas])
    for name in count_names:
        lines.append([name, *(_format(results[n].counts.get(name, 0)) for n in names), *([""] * len(differences))])
    widths = [max(len(row[c]) for row in [header, *lines]) for c in range(len(header))]

    def fmt(row: list[str]) -> str:
        return "  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(row, widths)))

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(header), rule, *(fmt(r) for r in lines[: len(metric_names)]), rule,
                      *(fmt(r) for r in lines[len(metric_names):])])


TABLE_SUFFIXES = (".csv", ".json", ".jsonl")


def check_table_path(path: str | Path) -> Path:
    """A per-sample table file name with a supported suffix (checked before any work is done)."""
    target = Path(path)
    if target.suffix.lower() not in TABLE_SUFFIXES:
        raise ConfigError(f"--output {str(target)!r}: use a file name ending in {', '.join(TABLE_SUFFIXES)}")
    return target


def write_table(table: pd.DataFrame, path: str | Path) -> str:
    """Write a per-sample table as CSV (.csv), a JSON list (.json) or JSON Lines (.jsonl)."""
    target = check_table_path(path)
    suffix = target.suffix.lower()
    target.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".csv":
        table.to_csv(target, index=False)
    elif suffix == ".json":
        target.write_text(table.to_json(orient="records", indent=1, force_ascii=False))
    elif suffix == ".jsonl":
        table.to_json(target, orient="records", lines=True, force_ascii=False)
    return str(target)
