"""Run one stage as a Ray Train `TorchTrainer`; the same code from 2 CPU workers to a GPU cluster.

Per-step metrics travel from rank 0 to a small actor that the driver drains while
the trainer runs, so they reach MLflow live and through the driver (workers never
need access to the tracking server).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray.data import ExecutionOptions
from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from components import storage
from components.cluster import on_this_node, use_gpu_for_training
from components.config import DuetConfig
from components.console import say, warn
from components.data.dataset import build_dataset
from components.disk_space import storage_full
from components.errors import find_disk_full
from components.layout import artifact_uri, storage_root, trainer_run_name
from components.model.artifact import check_compatible
from components.quiet import quiet_training_worker
from components.train.checkpoint_files import Damaged, newest_intact
from components.train.settings import LoopSettings, total_steps

# The dataset split each stage trains on: captions align VCE + projector, instructions fine-tune.
STAGE_SPLITS = {1: "caption", 2: "train"}


@dataclass(frozen=True)
class StageData:
    """The shard sets a stage reads and what the model side needs to preprocess them."""

    train_uri: str
    num_train_samples: int
    digest: str
    processor_dir: str
    num_visual_tokens: int
    val_uri: str | None = None


@dataclass
class StageResult:
    artifact_uri: str
    run_name: str
    metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    checkpoint_path: str | None = None


@ray.remote(num_cpus=0)
class MetricsSink:
    """Buffers rank 0's per-step metrics until the driver drains them."""

    def __init__(self) -> None:
        self._rows: list[dict[str, Any]] = []
        self._resumed: list[int] = []
        self._damaged: list[tuple[Damaged, str | None]] = []

    def push(self, stage: int, metrics: dict[str, Any]) -> None:
        self._rows.append({"stage": stage, **metrics})

    def resumed(self, step: int) -> None:
        """A worker group restored a checkpoint taken at `step` (it may have no step left to train)."""
        self._resumed.append(step)

    def damaged(self, damaged: Damaged, used: str | None) -> None:
        """A worker group passed over damaged checkpoints (name, problems) and loaded `used` (None: none)."""
        self._damaged.append((damaged, used))

    def drain(self) -> tuple[list[dict[str, Any]], list[int], list[tuple[Damaged, str | None]]]:
        drained = self._rows, self._resumed, self._damaged
        self._rows, self._resumed, self._damaged = [], [], []
        return drained


def worker_datasets(cfg: DuetConfig, data: StageData, world: int) -> dict[str, ray.data.Dataset]:
    """One deterministic stream per worker: rank r keeps global records r, r+W, r+2W, ..."""
    datasets = {}
    for rank in range(world):
        datasets[f"train_{rank}"] = build_dataset(
            data.train_uri, cfg, data.processor_dir, data.num_visual_tokens, shard_index=rank, num_shards=world
        )
        if data.val_uri:
            datasets[f"val_{rank}"] = build_dataset(
                data.val_uri, cfg, data.processor_dir, data.num_visual_tokens, shard_index=rank, num_shards=world
            )
    return datasets


def _train_worker(raw: dict[str, Any]) -> None:
    """Ray Train's entry point on each worker: quiet libraries first (DeepSpeed is told its accelerator
    before it is imported), then the training loop."""
    quiet_training_worker(raw["use_gpu"])
    # DeepSpeed: imported only in the workers, after the settings above.
    from components.train.loop import train_loop_per_worker

    train_loop_per_worker(raw)


def _kept_checkpoint(run_folder: str) -> str:
    """What a stage stopped by a full disk leaves to resume from: the newest intact checkpoint of the run."""
    kept = newest_intact(Path(run_folder))
    if kept is None:
        return "no checkpoint was complete yet, the re-run starts the stage again"
    return f"the newest complete checkpoint ({kept[0]}, step {kept[1]}) is intact and still the latest"


RAY_TRAIN_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of a run's checkpoints


def set_aside_damaged_snapshot(cfg: DuetConfig, run_uri: str, stage: int) -> None:
    """Move Ray Train's checkpoint record of the run aside when it does not parse.

    Ray Train rewrites it in place at every checkpoint, so a full disk can leave it empty; it then refuses
    to start the run at all ("Expecting value"). Set aside, the run starts with no record and each worker
    resumes from the newest intact checkpoint folder of the run (components.train.loop), losing nothing.
    """
    uri = storage.join(run_uri, RAY_TRAIN_SNAPSHOT)
    try:
        text = storage.read_text(uri, cfg.storage)
    except FileNotFoundError:
        return
    try:
        json.loads(text)
        return
    except ValueError:
        pass
    kept = f"{uri}.damaged"
    storage.write_text(kept, text, cfg.storage)
    storage.delete_file(uri, cfg.storage)
    warn(f"stage{stage}: Ray Train's checkpoint record {uri} is damaged ({len(text)} bytes, not JSON; a full disk "
         f"while it was written?); kept as {kept}, the stage resumes from the newest intact checkpoint of the run")


def run_stage(
    cfg: DuetConfig,
    stage: int,
    data: StageData,
    stage1_artifact: str | None = None,
    on_metrics: Callable[[list[dict[str, Any]]], None] | None = None,
    run_name: str | None = None,
    artifact: str | None = None,
    callbacks: list[Any] | None = None,
    run_id: str | None = None,
    datasets: dict[str, ray.data.Dataset] | None = None,
) -> StageResult:
    """Train one stage to completion (resuming if a run of the same name exists) and write its artifact.

    `run_name` and `artifact` override the stable defaults (Tune trials use their own); `callbacks`
    are Ray Train callbacks, e.g. Tune's `TuneReportCallback` when the stage runs inside a trial;
    `run_id` (the stage's MLflow run) is recorded in the artifact. `datasets` replaces the per-worker
    streams from the shards (named as `worker_datasets` names them: benchmarks train on preprocessed,
    materialised ones to time the orchestration alone). Everything a worker would refuse
    (the stage-1 artifact, too few samples for one global batch) is checked here first: a worker's
    error would be retried `scaling.max_failures` times before it reached the user.
    """
    if stage == 2:
        if stage1_artifact is None:
            raise ValueError("stage 2 needs the stage-1 artifact URI (run stage 1 first, or pass --stage1-artifact)")
        check_compatible(cfg, stage1_artifact, stage=1)
    total_steps(cfg.stage(stage), data.num_train_samples)
    use_gpu = use_gpu_for_training(cfg)
    world = cfg.scaling.num_workers
    name = run_name or trainer_run_name(cfg, stage)
    out_uri = artifact or artifact_uri(cfg, stage)
    fs, root = storage.resolve(storage_root(cfg), cfg.storage)
    name_in_storage = storage.join(storage_root(cfg), name)
    set_aside_damaged_snapshot(cfg, name_in_storage, stage)
    sink = MetricsSink.options(scheduling_strategy=on_this_node()).remote()  # lives with the driver
    settings = LoopSettings(
        config=cfg.model_dump(mode="json"), stage=stage, num_train_samples=data.num_train_samples,
        artifact_uri=out_uri, data_digest=data.digest, stage1_artifact=stage1_artifact, use_gpu=use_gpu,
        train_dataset="train", val_dataset="val" if data.val_uri else None, metrics_sink=sink,
        processor_dir=data.processor_dir, run_id=run_id,
    )
    resources = {"CPU": cfg.scaling.cpus_per_worker, **cfg.scaling.resources_per_worker}
    if use_gpu:
        resources["GPU"] = cfg.scaling.gpus_per_worker
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config=settings.to_dict(),
        scaling_config=ScalingConfig(num_workers=world, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=name, storage_path=root, storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=cfg.scaling.max_failures,
                                         max_preemption_failures=cfg.scaling.max_preemption_failures),
            callbacks=callbacks or None,
            # Ray Train's own INFO lines (every report, every checkpoint, worker-group start) stay in its log files.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
        datasets=datasets if datasets is not None else worker_datasets(cfg, data, world),
        # Not split by Ray: every worker reads its own deterministic stream, in order.
        dataset_config=DataConfig(datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True)),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
    )
    history: list[dict[str, Any]] = []
    stop = threading.Event()

    def drain() -> None:
        rows, resumed, damaged = ray.get(sink.drain.remote())
        for passed_over, used in damaged:
            for checkpoint_name, problems in passed_over:
                warn(f"stage{stage}: checkpoint {storage.join(name_in_storage, checkpoint_name)} is damaged and was not loaded: "
                     + "; ".join(problems))
            if used is None:
                warn(f"stage{stage}: no intact checkpoint is left, training starts again from step 0")
        for resumed_step in resumed:
            say(f"stage{stage}: resumed from checkpoint at step {resumed_step}")
        for row in rows:
            if history and row["step"] <= history[-1]["step"]:
                # A replaced worker group resumed from the last checkpoint: later steps were rolled back.
                redone = [h["step"] for h in history if h["step"] >= row["step"]]
                say(f"stage{stage}: step{'s' if len(redone) > 1 else ''} "
                    f"{redone[0]}{f'-{redone[-1]}' if len(redone) > 1 else ''} ran after that checkpoint and "
                    f"{'are' if len(redone) > 1 else 'is'} trained again")
                history[:] = [h for h in history if h["step"] < row["step"]]
            history.append(row)
        if rows and on_metrics is not None:
            on_metrics(rows)

    def pump() -> None:
        while not stop.wait(2.0):
            drain()

    pumper = threading.Thread(target=pump, name="duet-metrics", daemon=True)
    pumper.start()
    try:
        result = trainer.fit()
    except Exception as exc:
        if find_disk_full(exc) is None or storage.is_remote(root):
            raise
        run_folder = storage.resolve(name_in_storage)[1]
        raise storage_full(f"stage{stage}'s checkpoint", run_folder, _kept_checkpoint(run_folder)) from exc
    finally:
        stop.set()
        pumper.join()
        drain()
        ray.kill(sink)
    if result.error is not None:
        raise result.error
    checkpoint = result.checkpoint.path if result.checkpoint is not None else None
    return StageResult(out_uri, name, dict(result.metrics or {}), history, checkpoint)
