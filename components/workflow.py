"""The steps of the pipeline and how they connect: data, base model, stages, tracking.

Each step is recognised as done by what it left behind (a manifest with the same
inputs, a finished MLflow run with the same step hash whose artifact still
exists), so a re-run after a failure resumes at the first incomplete step.
A step's hash covers only the config sections that change its result: the
worker count, for one, does not (runs are reproducible across worker counts).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray
from transformers import LlavaConfig

from components import storage
from components.config import PipelineConfig
from components.data.prepare import SplitResult, prepare, split_uri
from components.data.shards import read_manifest, shard_uris
from components.model.mllm import local_checkpoint
from components.model.tiny import save_tiny_checkpoint
from components.tracking import TAG_CONFIG_HASH, TAG_DATASET_DIGEST, TAG_STEP, Tracker
from components.train.stage import StageData, StageResult, artifact_uri, run_stage

log = logging.getLogger("duet")

STAGE_SPLITS = {1: "caption", 2: "train"}
TAG_STEP_HASH = "duet.step_hash"
TAG_ARTIFACT = "duet.artifact.stage"


def say(message: str) -> None:
    """Progress for the person at the terminal (and the job log under `ray job submit`)."""
    print(f"[duet] {message}", flush=True)


def init_ray(cfg: PipelineConfig) -> None:
    """Join the cluster in RAY_ADDRESS (e.g. under `ray job submit`) or start a local one.

    A local Ray gets at least 4 logical CPUs: training workers and the Ray Data
    actors that feed them must be schedulable side by side even on a 2-core laptop.
    """
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=True)


def step_hash(cfg: PipelineConfig, step: str, **inputs: Any) -> str:
    """Digest of what determines a step's output: its config sections plus its inputs (digests, URIs)."""
    sections: dict[str, list[str]] = {
        "stage1": ["model", "vce", "stage1", "deepspeed"],
        "stage2": ["model", "vce", "adapter", "stage2", "deepspeed"],
        "evaluate": ["eval"],
    }
    dumped = cfg.model_dump(mode="json")
    payload = {s: dumped[s] for s in sections.get(step, [])}
    payload.update(seed=cfg.run.seed, precision=cfg.deepspeed.precision, inputs=inputs, step=step)
    payload["data_template"] = [cfg.data.conversation_template, cfg.data.caption_template]
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- data and base model


def ensure_dataset(cfg: PipelineConfig) -> dict[str, SplitResult]:
    """Write the dataset's splits, re-using every split whose manifest already matches its inputs."""
    results = {r.split: r for r in prepare(cfg.data, cfg.storage, progress=say)}
    for result in results.values():
        state = "reused" if result.reused else "written"
        say(f"data {result.split}: {result.manifest.count} records, digest {result.manifest.digest[:12]} ({state})")
    return results


def ensure_base_model(cfg: PipelineConfig, splits: dict[str, SplitResult]) -> str:
    """The base checkpoint directory; for `model.arch: tiny` it is built (and warmed up) when missing."""
    if cfg.model.arch != "tiny" or storage.is_remote(cfg.model.checkpoint or ""):
        return local_checkpoint(cfg.model.checkpoint or "", cfg.storage)
    path = storage.resolve(cfg.model.checkpoint or "")[1]
    if os.path.isfile(os.path.join(path, "config.json")):
        say(f"base model: {path} (reused)")
        return path
    texts = _warmup_texts(cfg, splits)
    say(f"base model: building the tiny LLaVA at {path} ({cfg.model.tiny.warmup_steps} warm-up steps on "
        f"{len(texts)} texts)")
    return save_tiny_checkpoint(cfg.model.tiny, path, texts, seed=cfg.run.seed)


def _warmup_texts(cfg: PipelineConfig, splits: dict[str, SplitResult], limit: int = 4000) -> list[str]:
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


def stage_data(cfg: PipelineConfig, stage: int, base_dir: str) -> StageData:
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


# ---------------------------------------------------------------- stages with tracking


@dataclass
class StepOutcome:
    run_id: str
    artifact_uri: str
    reused: bool
    metrics: dict[str, Any]


def tracked_stage(
    cfg: PipelineConfig,
    tracker: Tracker,
    parent_run_id: str,
    stage: int,
    data: StageData,
    stage1: StepOutcome | None = None,
    reuse: bool = True,
) -> StepOutcome:
    """Run (or re-use) one stage as a child run: config params, dataset input, live metrics, curves, lineage."""
    name = f"stage{stage}"
    digest = step_hash(cfg, name, data=data.digest, stage1=stage1.artifact_uri if stage1 else None)
    if reuse:
        done = tracker.find_run({TAG_STEP: name, TAG_STEP_HASH: digest})
        if done is not None:
            uri = done.data.tags.get(TAG_ARTIFACT, "")
            if uri and storage.exists(storage.join(uri, "artifact.json"), cfg.storage):
                say(f"{name}: reused run {done.info.run_id} ({uri})")
                return StepOutcome(done.info.run_id, uri, True, dict(done.data.metrics))
    with tracker.child_run("stage", name, parent_run_id, tags={TAG_STEP_HASH: digest}) as run_id:
        tracker.log_config(run_id, cfg)
        tracker.log_dataset(run_id, f"{cfg.data.name}/{STAGE_SPLITS[stage]}", data.train_uri, data.digest)
        tracker.set_tags(run_id, {TAG_DATASET_DIGEST: data.digest})
        if stage1 is not None:
            tracker.tag_lineage(run_id, stage1.run_id, stage1.artifact_uri, data.digest)

        def on_metrics(rows: list[dict[str, Any]]) -> None:
            for row in rows:
                values = {k: float(v) for k, v in row.items() if isinstance(v, int | float) and k != "stage"}
                tracker.log_metrics(run_id, values, step=int(row["step"]))

        say(f"{name}: training ({cfg.scaling.num_workers} workers, ZeRO-{cfg.deepspeed.zero_stage})")
        result = run_stage(
            cfg, stage, data, stage1_artifact=stage1.artifact_uri if stage1 else None, on_metrics=on_metrics
        )
        tracker.log_curves(run_id, result.history)
        tracker.set_tags(run_id, {TAG_ARTIFACT: result.artifact_uri, TAG_CONFIG_HASH: cfg.hash()})
        say(f"{name}: done, artifact {result.artifact_uri}")
        return StepOutcome(run_id, result.artifact_uri, False, _final_metrics(result))


def _final_metrics(result: StageResult) -> dict[str, Any]:
    return {k: v for k, v in result.metrics.items() if isinstance(v, int | float)}


def run_single_stage(
    cfg: PipelineConfig, stage: int, stage1_artifact: str | None = None,
    progress: Callable[[str], None] = say,
) -> StepOutcome:
    """What pipelines/pretrain.py and finetune.py run: data, base model, one tracked stage."""
    init_ray(cfg)
    tracker = Tracker(cfg.tracking, cfg.run.work_dir)
    tracker.check_reachable()
    splits = ensure_dataset(cfg)
    base_dir = ensure_base_model(cfg, splits)
    data = stage_data(cfg, stage, base_dir)
    with tracker.parent_run(f"{cfg.run.name}-stage{stage}") as parent:
        stage1 = None
        if stage == 2:
            uri = stage1_artifact or artifact_uri(cfg, 1)
            stage1 = StepOutcome(run_id="", artifact_uri=uri, reused=True, metrics={})
            found = tracker.find_run({TAG_ARTIFACT: uri}) if stage1_artifact is None else None
            if found is not None:
                stage1.run_id = found.info.run_id
        return tracked_stage(cfg, tracker, parent, stage, data, stage1)
