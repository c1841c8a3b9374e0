"""Plan and write a dataset's splits from the data config, re-using splits whose inputs are unchanged.

Splits land under ``{data.root}/{data.name}/{split}/``, each with its own manifest:

- synthetic: ``caption`` (stage 1; ``data.caption_records`` records, default ``num_records``)
  and ``train`` / ``validation`` / ``test`` (stage 2 and evaluation), which are consecutive
  index ranges of the instruction stream (``num_records`` in all, cut by the fractions).
- llava / unifood: ``train`` / ``validation`` / ``test``, assigned by a hash of (seed, record
  id), so a split is stable when the input is reordered. UniFood's three records of one
  dish always share a split. For llava, ``data.caption_input`` (optional) is written whole
  as the ``caption`` split.

A split is re-used (not rewritten) when its manifest exists, records the same
inputs digest (source kind and parameters, schema version, sha256 of the input
JSON) and all its shards are present with their listed sizes. Image files are
not hashed for this check: replace images under a new input file or dataset name.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from components.config import DataSection, StorageSection
from components.data import sources
from components.data.shards import (
    SCHEMA_VERSION,
    Manifest,
    ManifestError,
    read_manifest,
    shards_present,
    write_shards,
)
from components.data.synthetic import SyntheticShapes
from components.layout import split_uri

SYNTHETIC_VERSION = 1


@dataclass(frozen=True)
class SplitPlan:
    """One split to write: where, what it is made of, and the records (generated lazily)."""

    split: str
    uri: str
    source: dict[str, Any]
    records: Callable[[], Iterable[dict]]

    @property
    def inputs_digest(self) -> str:
        canonical = json.dumps({"schema": SCHEMA_VERSION, "split": self.split, "source": self.source}, sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class SplitResult:
    split: str
    uri: str
    manifest: Manifest
    reused: bool


def _split_sizes(total: int, val_fraction: float, test_fraction: float) -> dict[str, int]:
    def part(fraction: float) -> int:
        return max(1, round(total * fraction)) if fraction > 0 else 0

    val, test = part(val_fraction), part(test_fraction)
    train = total - val - test
    if train < 1:
        raise ValueError(f"data.num_records={total} leaves no training records after validation/test; raise it")
    return {"train": train, "validation": val, "test": test}


def synthetic_plans(data: DataSection) -> list[SplitPlan]:
    common = {"kind": "synthetic", "generator": "shapes", "version": SYNTHETIC_VERSION, "seed": data.seed,
              "image_size": data.image_size, "records_per_shard": data.records_per_shard}
    caption = SyntheticShapes(data.seed, data.image_size, "caption")
    instruct = SyntheticShapes(data.seed, data.image_size, "instruct")
    n_caption = data.caption_records or data.num_records
    plans = [SplitPlan("caption", split_uri(data, "caption"), {**common, "stream": "caption", "range": [0, n_caption]},
                       lambda: caption.records(0, n_caption))]
    start = 0
    for split, size in _split_sizes(data.num_records, data.val_fraction, data.test_fraction).items():
        if size == 0:
            continue
        lo, hi = start, start + size
        plans.append(SplitPlan(split, split_uri(data, split), {**common, "stream": "instruct", "range": [lo, hi]},
                               lambda lo=lo, hi=hi: instruct.records(lo, hi)))
        start = hi
    return plans


def _numbered_for_split(entries: list[dict], uri: str, data: DataSection, split: str) -> Iterator[tuple[int, dict]]:
    for n, entry in enumerate(entries):
        rid = sources.entry_id(entry, n, uri)
        if sources.assign_split(rid, data.seed, data.val_fraction, data.test_fraction) == split:
            yield n, entry


def file_plans(data: DataSection, storage_cfg: StorageSection | None) -> list[SplitPlan]:
    """Plans for llava / unifood inputs (entries are read once and shared by the splits)."""
    assert data.input is not None
    image_root = data.image_root or sources.default_image_root(data.input)
    entries = sources.load_entries(data.input, storage_cfg)
    counts = Counter(sources.entry_id(e, n, data.input) for n, e in enumerate(entries))
    dupes = sorted(i for i, c in counts.items() if c > 1)
    if dupes:
        raise sources.RecordError(f"input file {data.input}: duplicate ids {dupes[:5]}; ids must be unique")
    common = {"kind": data.source, "input": data.input, "input_sha256": sources.file_digest(data.input, storage_cfg),
              "image_root": image_root, "seed": data.seed, "val_fraction": data.val_fraction,
              "test_fraction": data.test_fraction, "records_per_shard": data.records_per_shard}
    convert = sources.llava_records if data.source == "llava" else sources.unifood_records
    plans = []
    for split in ("train", "validation", "test"):
        plans.append(SplitPlan(
            split, split_uri(data, split), common,
            lambda split=split: convert(_numbered_for_split(entries, data.input, data, split), data.input,
                                        image_root, storage_cfg, threads=data.io_threads),
        ))
    if data.source == "llava" and data.caption_input:
        caption_root = data.image_root or sources.default_image_root(data.caption_input)
        source = {"kind": "llava", "input": data.caption_input, "image_root": caption_root,
                  "input_sha256": sources.file_digest(data.caption_input, storage_cfg),
                  "records_per_shard": data.records_per_shard}
        plans.insert(0, SplitPlan(
            "caption", split_uri(data, "caption"), source,
            lambda: sources.llava_records(enumerate(sources.load_entries(data.caption_input, storage_cfg)),
                                          data.caption_input, caption_root, storage_cfg, task="caption",
                                          threads=data.io_threads),
        ))
    return plans


def plan_splits(data: DataSection, storage_cfg: StorageSection | None = None) -> list[SplitPlan]:
    """The splits the config asks for, in writing order."""
    return synthetic_plans(data) if data.source == "synthetic" else file_plans(data, storage_cfg)


def existing_manifest(plan: SplitPlan, storage_cfg: StorageSection | None) -> Manifest | None:
    """The split's manifest when it was written from the same inputs and is complete, else None."""
    try:
        manifest = read_manifest(plan.uri, storage_cfg)
    except ManifestError:
        return None
    if manifest.inputs_digest != plan.inputs_digest or not shards_present(plan.uri, manifest, storage_cfg):
        return None
    return manifest


def prepare(
    data: DataSection, storage_cfg: StorageSection | None = None, progress: Callable[[str], None] | None = None
) -> list[SplitResult]:
    """Write (or re-use) every planned split; returns one result per split that holds records."""
    results = []
    for plan in plan_splits(data, storage_cfg):
        manifest = existing_manifest(plan, storage_cfg)
        if manifest is not None:
            results.append(SplitResult(plan.split, plan.uri, manifest, reused=True))
            continue
        if progress:
            progress(f"writing split {plan.split} to {plan.uri}")
        records = iter(plan.records())
        first = next(records, None)
        if first is None:
            if progress:
                progress(f"split {plan.split}: no records (fractions too small for this input); skipped")
            continue
        manifest = write_shards(
            _chain(first, records), plan.uri, split=plan.split, source=plan.source,
            inputs_digest=plan.inputs_digest, records_per_shard=data.records_per_shard, cfg=storage_cfg,
        )
        results.append(SplitResult(plan.split, plan.uri, manifest, reused=False))
    return results


def _chain(first: dict, rest: Iterator[dict]) -> Iterator[dict]:
    yield first
    yield from rest

