"""The Ray Data preprocessors (map steps) of the training dataset (see components.data.dataset).

Kept free of torch and transformers imports: the actors that run them start
in about a second and stay small, which matters when preprocessing shares a
node with the trainer.
"""

from __future__ import annotations

import os
import zlib
from collections import Counter
from typing import Any

import numpy as np
import pandas as pd
import ray

from components.data import quality
from components.data.conversation import ConversationError, Encoder
from components.data.records import BadRecord, parse_row
from components.data.transform import ImageSpec, image_pixels, normalize


def shard_name(url: Any) -> str:
    """The shard file name of a row's __url__ (the reader's path: bucket/key or a local path)."""
    return os.path.basename(str(url)) if isinstance(url, str) and url else "<unknown shard>"


def keep_positions(batch: pd.DataFrame, index: int, count: int) -> pd.DataFrame:
    """Rows whose record position (the shard key, see shards.write_shards) is `index` modulo `count`.

    A key that is not a position (a foreign or damaged shard) is assigned by its CRC32 instead, so
    every row still belongs to exactly one worker and bad rows are counted, never silently lost.
    """
    keys = batch["__key__"].astype(str)
    positions = pd.to_numeric(keys, errors="coerce")
    fallback = keys.map(lambda k: zlib.crc32(k.encode()))
    positions = positions.where(positions.notna(), fallback).astype("int64")
    return batch[(positions % count) == index]


class TextPreprocessor:
    """Ray Data map step: validate rows and tokenise their conversations (one tokenizer call per batch)."""

    def __init__(self, encoder: Encoder, caption_template: str, monitor: ray.actor.ActorHandle) -> None:
        self.encoder = encoder
        self.caption_template = caption_template
        self.monitor = monitor

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        seen: Counter[str] = Counter()
        bad: list[tuple[str, str, str]] = []
        samples = []
        for row in batch.to_dict("records"):
            shard = shard_name(row.get("__url__"))
            seen[shard] += 1
            try:
                samples.append(parse_row(row))
            except BadRecord as exc:
                bad.append((shard, str(row.get("__key__")), exc.reason))
        templates = [
            self.caption_template if s.meta.get("task") == "caption" else self.encoder.template for s in samples
        ]
        encodings = self.encoder.encode_many([s.conversations for s in samples], templates)
        out: dict[str, list] = {"key": [], "shard": [], "input_ids": [], "labels": [], "images": []}
        for sample, encoding in zip(samples, encodings):
            shard = shard_name(sample.shard)
            if isinstance(encoding, ConversationError):
                bad.append((shard, sample.key, encoding.reason))
                continue
            image_tokens = int((encoding["input_ids"] == self.encoder.image_token_id).sum())
            if image_tokens != len(sample.images) * self.encoder.num_visual_tokens:
                bad.append((shard, sample.key, "image_mismatch"))
                continue
            out["key"].append(sample.key)
            out["shard"].append(shard)
            out["input_ids"].append(encoding["input_ids"])
            out["labels"].append(encoding["labels"])
            out["images"].append(sample.images)
        quality.report_batch(self.monitor, dict(seen), bad)
        return pd.DataFrame(out)


class ImagePreprocessor:
    """Decode and CLIP-transform each row's images; rows with a corrupt image are dropped and counted."""

    def __init__(self, spec: ImageSpec, max_pixels: int, monitor: ray.actor.ActorHandle) -> None:
        self.spec = spec
        self.max_pixels = max_pixels
        self.monitor = monitor

    def __call__(self, batch: pd.DataFrame) -> dict[str, np.ndarray]:
        bad: list[tuple[str, str, str]] = []
        kept: list[int] = []
        arrays: list[np.ndarray] = []
        counts: list[int] = []
        for i, row in enumerate(batch.itertuples(index=False)):
            try:
                images = [image_pixels(data, self.spec, self.max_pixels) for data in row.images]
            except BadRecord as exc:
                bad.append((row.shard, row.key, exc.reason))
                continue
            kept.append(i)
            arrays.extend(images)
            counts.append(len(images))
        if bad:
            quality.report_batch(self.monitor, {}, bad)
        height, width = self.spec.output_hw
        pixels = normalize(np.stack(arrays), self.spec) if arrays else np.zeros((0, 3, height, width), np.float32)
        per_row = np.split(pixels, np.cumsum(counts)[:-1]) if counts else []
        return {
            "input_ids": ragged([batch["input_ids"].iloc[i] for i in kept]),
            "labels": ragged([batch["labels"].iloc[i] for i in kept]),
            "pixel_values": ragged(per_row),
        }


def ragged(arrays: list[np.ndarray]) -> np.ndarray:
    """An object array holding one array per row (Ray stores it as a variable-shaped tensor column)."""
    out = np.empty(len(arrays), dtype=object)
    for i, array in enumerate(arrays):
        out[i] = array
    return out
