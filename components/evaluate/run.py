"""Evaluation by greedy batch generation on Ray Data, scored with the paper's task metrics (section 4.2).

::

    manifest's shards --read_webdataset (filesystem from storage.resolve, raw bytes, manifest order kept)
      -> prompt step (tasks): parse the row; the prompt is the conversation up to its last human
         turn rendered in the training template (ending where the answer starts, e.g. "ASSISTANT:"),
         tokenised with every <image> expanded to the model's visual tokens; images decoded and
         CLIP-resized (uint8, normalised later next to the model)
      -> generation step (actor pool of eval.num_replicas, a GPU each when GPUs are used): one model
         replica per actor, left-padded batches of eval.batch_size, greedy model.generate
      -> driver: scoring (score.py); a per-sample table

The model is a stage artifact URI (stage 1: VCE + projector trained on captions, no adapter, i.e.
the zero-shot baseline before instruction tuning; stage 2: the fine-tuned model) or None for the
bare base checkpoint (its own projector, no VCE).

Nothing about one sample stops an evaluation. Rows that cannot be asked (corrupt image, malformed
JSON, a prompt longer than model.max_length) or scored (a reference the metrics cannot read) are
skipped and counted by reason (``counts["skipped/<reason>"]``). Predictions are never skipped: an
unparseable answer scores as wrong and is counted (``counts["<task>/unparseable"]``).

Determinism: the dataset keeps manifest order (``preserve_order``), so each batch holds the same
samples whatever the number of replicas, and greedy decoding then gives the same predictions with
one replica or several on the same hardware.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import ray

from components import storage
from components.cluster import use_gpu_for_evaluation
from components.config import DuetConfig, config_from_dict
from components.data.conversation import (
    ConversationError,
)
from components.data.records import BadRecord, parse_row
from components.data.shards import Manifest, read_manifest, shard_uris
from components.evaluate.generate import Generator
from components.evaluate.prompts import (
    PromptBuilder,
    image_digest,
    question_text,
    split_reference,
    visual_token_count,
)
from components.evaluate.score import TEXT_COLUMNS, EvalResult, score_rows
from components.model.artifact import check_compatible
from components.quiet import quiet_model_worker

log = logging.getLogger(__name__)


PROMPT_BATCH_SIZE = 64


def _ragged(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """One array per row as an object array (Ray stores it as a variable-shaped tensor column)."""
    out = np.empty(len(arrays), dtype=object)
    for i, array in enumerate(arrays):
        out[i] = array
    return out


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
    """Ray Data map step: raw WebDataset rows -> text columns, `input_ids` and `images` per row (blank if `blind`)."""
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


class GeneratorActor:
    """Ray Data actor: holds one model replica and adds a `prediction` column to each batch."""

    def __init__(self, config: dict[str, Any], model_source: str | None, processor_dir: str,
                 max_new_tokens: int, batch_size: int, device: str) -> None:
        quiet_model_worker()
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


def generation_dataset(
    cfg: DuetConfig, model_source: str | None, split_uri: str, processor_dir: str, blind: bool = False
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
    gpu = use_gpu_for_evaluation(cfg)
    return dataset.map_batches(
        GeneratorActor,
        fn_constructor_kwargs={
            "config": cfg.model_dump(mode="json"), "model_source": model_source, "processor_dir": processor_dir,
            "max_new_tokens": cfg.eval.max_new_tokens, "batch_size": cfg.eval.batch_size,
            "device": "cuda" if gpu else "cpu",
        },
        batch_format="numpy", batch_size=cfg.eval.batch_size,
        compute=ray.data.ActorPoolStrategy(size=cfg.eval.num_replicas),
        num_cpus=cfg.eval.cpus_per_replica, num_gpus=cfg.eval.gpus_per_replica if gpu else 0,
    )


def check_model_source(cfg: DuetConfig, model_source: str | None) -> None:
    """Fail on the driver, naming the difference, before any replica loads a mismatched artifact."""
    if model_source is not None:
        check_compatible(cfg, model_source)


def evaluate(
    cfg: DuetConfig, model_source: str | None, split_uri: str, processor_dir: str, blind: bool = False,
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
