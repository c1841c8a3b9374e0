"""Streaming preprocessing on Ray Data: shards -> validated, tokenised, image-transformed training rows.

::

    read_webdataset(manifest's shards, filesystem from storage.resolve, raw bytes)
      -> TextPreprocessor  (actor pool): parse + validate the JSON, chat template, tokenise with
                                         assistant-only labels; bad rows dropped and counted
      -> ImagePreprocessor (actor pool): decode + validate images, RGB, CLIP pad/resize/crop,
                                         batch-normalise; corrupt images dropped and counted
      -> Dataset with input_ids, labels (variable length) and pixel_values (n_images, 3, H, W)

The dataset is lazy: hand it to ``TorchTrainer(datasets=...)`` and read it with
``get_dataset_shard(...).iter_torch_batches(collate_fn=make_collate(...))``; it is
never materialised. Skipped rows are counted per reason by the split's monitor
(see ``components.data.quality``): the run stops as soon as the bad rows exceed
``data.max_bad_fraction`` of the manifest's record count, and ``quality_report``
gives the counts to the driver or the trainer.

Records whose task is ``caption`` use ``data.caption_template`` (LLaVA's ``plain`` for
stage 1); all others use ``data.conversation_template``. The tokenizer is loaded on
the driver and shipped to the actors, so the model directory only has to be
readable where ``build_dataset`` runs (a local path or an s3:// URI).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch
from ray.data.collate_fn import NumpyBatchCollateFn
from transformers import AutoTokenizer

from components import storage
from components.config import DuetConfig, StorageSection
from components.data import quality
from components.data.conversation import IGNORE_INDEX, Encoder
from components.data.packing import pack
from components.data.preprocessors import ImagePreprocessor, TextPreprocessor, keep_positions
from components.data.shards import Manifest, read_manifest, shard_uris
from components.data.transform import ImageSpec, load_image_spec

# Files of a model directory the data side needs (never the weights).
_PROCESSOR_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
    "preprocessor_config.json", "processor_config.json", "chat_template.json", "chat_template.jinja",
)
TEXT_BATCH_SIZE = 256


# ---------------------------------------------------------------- model side


def local_processor_dir(processor_dir: str, cfg: StorageSection | None = None) -> str:
    """A local directory with the tokenizer and image processor files (downloaded when remote)."""
    if not storage.is_remote(processor_dir):
        if not os.path.isdir(processor_dir):
            raise FileNotFoundError(f"model directory {processor_dir} not found (tokenizer + preprocessor config)")
        return processor_dir
    # One cache folder per URI, refreshed on every call (small files only), so nothing piles up in /tmp.
    digest = hashlib.sha256(processor_dir.encode()).hexdigest()[:16]
    target = os.path.join(tempfile.gettempdir(), f"duet-processor-{digest}")
    found = 0
    for name in _PROCESSOR_FILES:
        uri = storage.join(processor_dir, name)
        if storage.exists(uri, cfg):
            storage.write_bytes(os.path.join(target, name), storage.read_bytes(uri, cfg))
            found += 1
    if not found:
        raise FileNotFoundError(f"no tokenizer or processor files under {processor_dir}")
    return target


def load_tokenizer(processor_dir: str, cfg: StorageSection | None = None):
    """The model directory's fast tokenizer (needed for label offsets); it must define a pad token."""
    tokenizer = AutoTokenizer.from_pretrained(local_processor_dir(processor_dir, cfg))
    if tokenizer.pad_token_id is None:
        raise ValueError(f"the tokenizer in {processor_dir} has no pad token; set pad_token when saving it")
    return tokenizer


# ---------------------------------------------------------------- the dataset


def build_dataset(
    split_uri: str,
    cfg: DuetConfig,
    processor_dir: str,
    num_visual_tokens: int,
    *,
    shuffle_files: bool = False,
    shard_index: int = 0,
    num_shards: int = 1,
) -> ray.data.Dataset:
    """The lazy training dataset of one prepared split (see the module docstring for the preprocessors).

    With `num_shards` > 1 only the records whose global position is `shard_index`
    modulo `num_shards` are kept, before anything is decoded: one deterministic
    stream per training worker, the same global order for any worker count.
    """
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index must be in [0, {num_shards}), got {shard_index}")
    data = cfg.data
    inputs = preprocessing_inputs(split_uri, cfg, processor_dir, num_visual_tokens)
    shuffle = ray.data.FileShuffleConfig(seed=data.seed) if shuffle_files else None
    dataset = ray.data.read_webdataset(
        inputs.paths, filesystem=inputs.filesystem, decoder=None, shuffle=shuffle, num_cpus=data.preprocess_num_cpus
    )
    if num_shards > 1:
        dataset = dataset.map_batches(
            keep_positions, fn_kwargs={"index": shard_index, "count": num_shards},
            batch_format="pandas", num_cpus=data.preprocess_num_cpus,
        )
    dataset = dataset.map_batches(
        TextPreprocessor,
        fn_constructor_kwargs={
            "encoder": inputs.encoder, "caption_template": data.caption_template, "monitor": inputs.monitor,
        },
        batch_format="pandas", batch_size=TEXT_BATCH_SIZE, num_cpus=data.preprocess_num_cpus,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=data.transform_concurrency),
    )
    return dataset.map_batches(
        ImagePreprocessor,
        fn_constructor_kwargs={
            "spec": inputs.image_spec, "max_pixels": data.max_image_pixels, "monitor": inputs.monitor,
        },
        batch_format="pandas", batch_size=data.preprocess_batch_size, num_cpus=data.preprocess_num_cpus,
        compute=ray.data.ActorPoolStrategy(size=data.transform_concurrency),
    )


@dataclass(frozen=True)
class PreprocessingInputs:
    """What reading and preprocessing one split needs: its shard files and the two preprocessors' arguments."""

    paths: list[str]
    filesystem: Any
    encoder: Encoder
    image_spec: ImageSpec
    monitor: ray.actor.ActorHandle


def preprocessing_inputs(split_uri: str, cfg: DuetConfig, processor_dir: str,
                         num_visual_tokens: int) -> PreprocessingInputs:
    """The shards of a prepared split and the tokenizer/image settings of a model directory."""
    manifest = read_manifest(split_uri, cfg.storage)
    fs, _ = storage.resolve(split_uri, cfg.storage)
    paths = [storage.resolve(uri, cfg.storage)[1] for uri in shard_uris(split_uri, manifest)]
    local_dir = local_processor_dir(processor_dir, cfg.storage)
    encoder = Encoder(load_tokenizer(local_dir), cfg.data.conversation_template, num_visual_tokens,
                      cfg.model.max_length)
    return PreprocessingInputs(paths, fs, encoder, load_image_spec(local_dir),
                               split_monitor(manifest, cfg.data.max_bad_fraction))


def split_monitor(manifest: Manifest, max_bad_fraction: float) -> ray.actor.ActorHandle:
    return quality.get_monitor(manifest.split, manifest.digest, manifest.count, max_bad_fraction)


def quality_report(split_uri: str, cfg: DuetConfig) -> quality.QualityReport | None:
    """Skipped-row counts so far for a split streamed in this Ray job (None when it was not streamed)."""
    manifest = read_manifest(split_uri, cfg.storage)
    return quality.read_report(manifest.digest, cfg.data.max_bad_fraction)


# ---------------------------------------------------------------- batching


def collate(batch: dict[str, np.ndarray], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest sample; concatenate every sample's images in order.

    Returns input_ids (pad_token_id), labels (-100) and attention_mask (0) padded to
    (B, L), and pixel_values (total images in the batch, 3, H, W): the layout LLaVA's
    forward expects, whose image tokens are filled in the same order.
    """
    ids = [np.asarray(x, dtype=np.int64) for x in batch["input_ids"]]
    labels = [np.asarray(x, dtype=np.int64) for x in batch["labels"]]
    if not ids:
        raise ValueError("collate got an empty batch")
    length = max(len(x) for x in ids)
    input_ids = np.full((len(ids), length), pad_token_id, dtype=np.int64)
    label_out = np.full((len(ids), length), IGNORE_INDEX, dtype=np.int64)
    mask = np.zeros((len(ids), length), dtype=np.int64)
    for i, (x, y) in enumerate(zip(ids, labels)):
        input_ids[i, : len(x)] = x
        label_out[i, : len(y)] = y
        mask[i, : len(x)] = 1
    pixels = [np.asarray(p, dtype=np.float32) for p in batch["pixel_values"]]
    pixel_values = np.concatenate(pixels, axis=0)
    return {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(label_out),
        "attention_mask": torch.from_numpy(mask),
        "pixel_values": torch.from_numpy(np.ascontiguousarray(pixel_values)),
    }


class Collate(NumpyBatchCollateFn):
    """`collate` (or, with `pack_to`, `packing.pack` into rows of at most that many tokens) bound to a pad
    token id, in the form iter_torch_batches(collate_fn=...) takes."""

    def __init__(self, pad_token_id: int, pack_to: int | None = None) -> None:
        self.pad_token_id = pad_token_id
        self.pack_to = pack_to

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        if self.pack_to is not None:
            return pack(batch, self.pad_token_id, self.pack_to)
        return collate(batch, self.pad_token_id)


def make_collate(processor_dir: str, cfg: StorageSection | None = None, pack_to: int | None = None) -> Collate:
    """The collate function for a model directory (its tokenizer's pad token id); `pack_to` packs
    (`data.packing`, rows of at most `model.max_length`)."""
    return Collate(int(load_tokenizer(processor_dir, cfg).pad_token_id), pack_to)
