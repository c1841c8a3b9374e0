"""Where everything duet writes lives: one function per kind of path, all derived from the config.

    {data.root}/{data.name}/{split}/            dataset splits: shards + manifest.json
    {storage}/{run.name}-{stage}-{step hash}/    Ray Train's run folder: checkpoints of one config
    {storage}/{run.name}/{stage}/artifact/       the stage artifact (components/model/artifact.py)
    {storage}/{run.name}/{stage}/unsent-metrics-{step hash}.json
                                                 a stage's metrics while the tracking store was away
    {storage}/{run.name}/sweeps/{experiment}/{trial}/artifact/
                                                 a sweep trial's stage-2 artifact
    {work_dir}/sweeps/{run.name}-best.yaml       a sweep's best config
    {work_dir}/eval/{evaluation}-{step hash}.csv the per-sample table of an evaluation
    {work_dir}/mlflow.db, {work_dir}/mlartifacts the embedded MLflow store and its artifacts

`{storage}` is `scaling.storage_path`, or `{work_dir}/runs`. Local paths are absolute once the
config has been through `DuetConfig.with_absolute_paths`.
"""

from __future__ import annotations

import os
from pathlib import Path

from components import storage
from components.config import DataSection, DuetConfig

SPLITS = ("caption", "train", "validation", "test")


def dataset_uri(data: DataSection) -> str:
    """The folder that holds every split of the configured dataset."""
    return storage.join(data.root, data.name)


def split_uri(data: DataSection, split: str) -> str:
    """Where a split of the configured dataset lives."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    return storage.join(dataset_uri(data), split)


def storage_root(cfg: DuetConfig) -> str:
    """Where Ray Train keeps checkpoints and stages keep artifacts: scaling.storage_path or the work dir."""
    return cfg.scaling.storage_path or os.path.join(os.path.abspath(cfg.run.work_dir), "runs")


def trainer_run_name(cfg: DuetConfig, stage: int, step_hash: str | None = None) -> str:
    """Ray Train's run name for a stage: stable per run name and step hash, so a re-run of the same config
    resumes from its latest checkpoint and a run of a changed config (another base, learning rate, stage-1
    artifact, ...) starts from step 0 in a folder of its own instead of resuming the old weights."""
    name = f"{cfg.run.name}-{cfg.stage(stage).name}"
    return f"{name}-{step_hash[:8]}" if step_hash else name


def artifact_uri(cfg: DuetConfig, stage: int) -> str:
    """The stage artifact of this run name."""
    return storage.join(storage_root(cfg), cfg.run.name, cfg.stage(stage).name, "artifact")


def unsent_metrics_uri(cfg: DuetConfig, stage: int, digest: str) -> str:
    """Where a stage keeps its metrics when the tracking store was away, until a re-run logs them."""
    return storage.join(storage_root(cfg), cfg.run.name, cfg.stage(stage).name, f"unsent-metrics-{digest}.json")


def sweep_artifact_root(cfg: DuetConfig, experiment: str) -> str:
    """The folder a sweep's trials write their stage-2 artifacts under."""
    return storage.join(storage_root(cfg), cfg.run.name, "sweeps", experiment)


def trial_artifact_uri(artifact_root: str, trial_id: str) -> str:
    """A sweep trial's stage-2 artifact: one folder per trial under the sweep's root."""
    return storage.join(artifact_root, trial_id, "artifact")


def best_config_path(cfg: DuetConfig) -> str:
    """Where a sweep writes its best config unless told: stable per run name, so later steps can find it."""
    return os.path.join(cfg.run.work_dir, "sweeps", f"{cfg.run.name}-best.yaml")


def study_dir(cfg: DuetConfig, study: str) -> str:
    """Where a method study writes its table, CSV and figure (also logged to the study's parent run)."""
    return os.path.join(cfg.run.work_dir, "studies", f"{cfg.run.name}-{study}")


def evaluation_table_path(cfg: DuetConfig, name: str, digest: str) -> str:
    """The local per-sample table of one evaluation (also logged to its MLflow run)."""
    return os.path.join(cfg.run.work_dir, "eval", f"{name}-{digest}.csv")


def tracking_store_uri(work_dir: str | Path) -> str:
    """The embedded MLflow store: SQLite under the work dir."""
    return f"sqlite:///{Path(work_dir).resolve() / 'mlflow.db'}"


def tracking_artifacts_uri(work_dir: str | Path) -> str:
    """Where the embedded store's experiments keep their artifacts."""
    return (Path(work_dir).resolve() / "mlartifacts").as_uri()
