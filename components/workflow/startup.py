"""The start-up every entry point shares (the full pipeline, single stages, sweeps, benchmarks), cheapest
checks first: nothing is trained before all of them pass. Then the dataset and the base model."""

from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoConfig, LlavaConfig

from components import storage
from components.cluster import check_fits, init_ray, pipeline_needs
from components.config import ConfigError, DuetConfig
from components.console import say
from components.data.prepare import SplitResult, prepare
from components.data.shards import read_manifest, shard_uris
from components.layout import dataset_uri, split_uri
from components.locks import build_lock
from components.model.llava import check_family, checkpoint_family, local_checkpoint
from components.model.tiny import built_recipe, save_tiny_checkpoint, tiny_recipe
from components.quiet import quiet_driver
from components.tracking.tracker import Tracker
from components.train.settings import total_steps
from components.train.stage import STAGE_SPLITS, StageData


@dataclass
class Workspace:
    """What every entry point needs before its first stage: the resolved config, the tracker, data, base."""

    cfg: DuetConfig
    tracker: Tracker
    splits: dict[str, SplitResult]
    base_dir: str
    base_reused: bool


def start(cfg: DuetConfig, stages: tuple[int, ...] = (1, 2)) -> Workspace:
    """The start-up every pipeline shares, cheapest checks first, so nothing is trained before all pass.

    Config paths made absolute; the tracking store answering (before Ray starts: an outage must not
    cost a cluster start or a stage); Ray joined or started; every step fitting the cluster at once;
    the dataset written or reused; each stage's data filling at least one global batch; the base
    model found, downloaded or (tiny) built.
    """
    cfg = cfg.with_absolute_paths()
    quiet_driver()
    tracker = Tracker(cfg.tracking, cfg.run.work_dir)
    tracker.check_reachable()
    say(init_ray(cfg))
    check_fits(pipeline_needs(cfg, has_validation=cfg.data.val_fraction > 0))
    splits = ensure_dataset(cfg)
    for stage in stages:
        split = splits.get(STAGE_SPLITS[stage])
        if split is not None:
            total_steps(cfg.stage(stage), split.manifest.count)
    base_dir, reused = ensure_base_model(cfg, splits)
    # A checkpoint in object storage is read only now: its family must be one duet trains, and its
    # vision tower decides the VCE layers.
    family = checkpoint_family(cfg.model.checkpoint or base_dir, Path(base_dir))
    check_family(cfg, family, cfg.model.checkpoint or base_dir)
    try:
        family.check_vce(AutoConfig.from_pretrained(base_dir), cfg.vce, f" of {cfg.model.checkpoint}")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return Workspace(cfg, tracker, splits, base_dir, reused)


def ensure_dataset(cfg: DuetConfig) -> dict[str, SplitResult]:
    """Write the dataset's splits, re-using every split whose manifest already matches its inputs."""
    with build_lock(cfg, dataset_uri(cfg.data)):  # a run writing the same dataset is waited for, then reused
        results = {r.split: r for r in prepare(cfg.data, cfg.storage, progress=say)}
    for result in results.values():
        state = "reused" if result.reused else "written"
        say(f"data {result.split}: {result.manifest.count} records, digest {result.manifest.digest[:12]} ({state})")
    return results


def ensure_base_model(cfg: DuetConfig, splits: dict[str, SplitResult]) -> tuple[str, bool]:
    """The base checkpoint directory and whether it already existed; `model.arch: tiny` is built when missing
    or when the base there was built from another recipe (its sizes, warm-ups, texts, VCE layers or seed)."""
    if cfg.model.arch != "tiny" or storage.is_remote(cfg.model.checkpoint or ""):
        return local_checkpoint(cfg.model.checkpoint or "", cfg.storage), True
    path = storage.resolve(cfg.model.checkpoint or "")[1]
    texts = _warmup_texts(cfg, splits)
    layers = [cfg.vce.anchor_layer, *cfg.vce.reference_layers]
    recipe = tiny_recipe(cfg.model.tiny, texts, cfg.run.seed, layers)
    with build_lock(cfg, path):  # a run building the same base is waited for, then its base reused
        if os.path.isfile(os.path.join(path, "config.json")):
            if built_recipe(path) == recipe:
                say(f"base model: {path} (reused)")
                return path, True
            say(f"base model: {path} was built from another recipe (model.tiny, the warm-up texts, the VCE layers "
                "or run.seed changed); rebuilding it")
        tiny = cfg.model.tiny
        captions = f", then {tiny.caption_warmup_steps} caption steps with the projector" if tiny.caption_warmup_steps else ""
        say(f"base model: building the tiny LLaVA at {path} (vision tower: {tiny.vision_warmup_steps} warm-up "
            f"steps on its own scenes; language model: {tiny.warmup_steps} steps on {len(texts)} texts{captions})")
        return save_tiny_checkpoint(tiny, path, texts, seed=cfg.run.seed, vision_layers=layers), False


def _warmup_texts(cfg: DuetConfig, splits: dict[str, SplitResult], limit: int = 4000) -> list[str]:
    """Plain text of the training splits' first shards: what a pretrained LLM would already have read."""
    texts: list[str] = []
    for name in ("caption", "train"):
        if name not in splits:
            continue
        for shard_uri in shard_uris(splits[name].uri, splits[name].manifest):
            with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(shard_uri, cfg.storage))) as tar:
                for member in tar.getmembers():
                    if not member.name.endswith(".json"):
                        continue
                    record = json.loads(tar.extractfile(member).read())  # type: ignore[union-attr]
                    turns = record.get("conversations", [])
                    texts.append(" ".join(str(t.get("value", "")).replace("<image>", "").strip() for t in turns))
            if len(texts) >= limit // 2:
                break
    return texts[:limit]


def stage_data(cfg: DuetConfig, stage: int, base_dir: str) -> StageData:
    """The shard sets and preprocessing inputs for one stage."""
    train_uri = split_uri(cfg.data, STAGE_SPLITS[stage])
    manifest = read_manifest(train_uri, cfg.storage)
    val_uri = split_uri(cfg.data, "validation")
    has_val = storage.exists(storage.join(val_uri, "manifest.json"), cfg.storage)
    llava = LlavaConfig.from_pretrained(base_dir)
    side = llava.vision_config.image_size // llava.vision_config.patch_size
    return StageData(
        train_uri=train_uri, num_train_samples=manifest.count, digest=manifest.digest, processor_dir=base_dir,
        num_visual_tokens=side * side, val_uri=val_uri if has_val and stage == 2 else None,
    )
