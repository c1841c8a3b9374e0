"""A training stage as a step of the pipeline: its MLflow child run, live metrics through outages, lineage.

Run (or reuse, by step hash) one stage: config params, dataset input, per-step metrics buffered
while the tracking store is away, curves, and the stage-1 lineage of a stage-2 run.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from components import storage
from components.config import DuetConfig
from components.console import StepProgress, say
from components.errors import ArtifactError
from components.layout import (
    artifact_uri,
    storage_root,
    trainer_run_name,
    unsent_metrics_uri,
)
from components.locks import run_lock
from components.model.artifact import artifact_identity, check_compatible, read_artifact_meta
from components.quiet import quiet_driver
from components.tracking.buffer import MetricsBuffer
from components.tracking.tags import (
    TAG_ARTIFACT,
    TAG_CONFIG_HASH,
    TAG_CONTINUES_RUN,
    TAG_DATASET_DIGEST,
    TAG_STEP,
    TAG_STEP_HASH,
)
from components.tracking.tracker import STORAGE_RETRIES, Tracker, TrackingUnreachable
from components.train.deepspeed import plan_batch
from components.train.settings import VAL_MEASURED, total_steps
from components.train.stage import STAGE_SPLITS, StageData, StageResult, run_stage
from components.train.step_time import format_breakdown
from components.workflow.startup import stage_data, start
from components.workflow.steps import StepOutcome, step_hash

log = logging.getLogger(__name__)

def stage1_lineage(cfg: DuetConfig, tracker: Tracker, uri: str) -> StepOutcome:
    """A stage-1 artifact given by URI, checked against the config, with the lineage it carries.

    The run that wrote it comes from its artifact.json when this tracking store holds that run (an
    artifact from another store or an older artifact without one is found by its URI tag, or has none).
    """
    meta = check_compatible(cfg, uri, stage=1)
    run_id = meta.run_id if meta.run_id and tracker.run_exists(meta.run_id) else None
    if run_id is None:
        found = tracker.find_run({TAG_ARTIFACT: uri})
        run_id = found.info.run_id if found is not None else None
    return StepOutcome(run_id, uri, True, {}, data_digest=meta.data_digest)


def _loggable(row: dict[str, Any]) -> dict[str, Any]:
    """A metrics row as MLflow should see it: val_loss only at the steps where it was measured."""
    out = {k: v for k, v in row.items() if k not in ("stage", VAL_MEASURED)}
    if not row.get(VAL_MEASURED):
        out.pop("val_loss", None)
    return out


def tracked_stage(
    cfg: DuetConfig,
    tracker: Tracker,
    parent_run_id: str,
    stage: int,
    data: StageData,
    stage1: StepOutcome | None = None,
    reuse: bool = True,
) -> StepOutcome:
    """Run (or re-use) one stage as a child run: config params, dataset input, live metrics, curves, lineage."""
    name = f"stage{stage}"
    stage1_identity = artifact_identity(stage1.artifact_uri, cfg.storage) if stage1 else None
    digest = step_hash(cfg, name, data=data.digest, stage1=stage1_identity)
    if reuse:
        done = tracker.find_run({TAG_STEP: name, TAG_STEP_HASH: digest})
        if done is not None:
            uri = done.data.tags.get(TAG_ARTIFACT, "")
            if uri and storage.exists(storage.join(uri, "artifact.json"), cfg.storage):
                # The artifact folder is per run name: a run of another config may have written it since.
                holder = read_artifact_meta(uri, cfg.storage).run_id
                if holder in (None, done.info.run_id):
                    say(f"{name}: reused run {done.info.run_id} ({uri})")
                    return StepOutcome(done.info.run_id, uri, True, dict(done.data.metrics), data.digest)
                say(f"{name}: run {done.info.run_id} trained this config, but {uri} now holds run {holder}'s "
                    "artifact (another config); training it again (from its last checkpoint)")
    retries_before = storage.retry_count()
    with tracker.child_run("stage", name, parent_run_id, tags={TAG_STEP_HASH: digest}) as run_id:
        tracker.log_config(run_id, cfg)
        tracker.log_dataset(run_id, f"{cfg.data.name}/{STAGE_SPLITS[stage]}", data.train_uri, data.digest)
        tracker.set_tags(run_id, {TAG_DATASET_DIGEST: data.digest})
        if stage1 is not None:
            tracker.tag_lineage(run_id, stage1.run_id, stage1.artifact_uri, data.digest, stage1.data_digest)

        carried = _take_unsent(cfg, stage, digest, tracker, run_id)
        buffer = MetricsBuffer(tracker, run_id)
        buffer.add(carried)
        stage_cfg = cfg.stage(stage)
        plan = plan_batch(stage_cfg, cfg.scaling.num_workers)
        say(f"{name}: training {total_steps(stage_cfg, data.num_train_samples)} steps on {plan.world_size} workers "
            f"(global batch {plan.global_batch} = {plan.world_size} x micro-batch {plan.micro_batch} x "
            f"accumulation {plan.accumulation}), ZeRO-{cfg.deepspeed.zero_stage}")
        progress = StepProgress(name, stage_cfg.log_every)

        def on_metrics(rows: list[dict[str, Any]]) -> None:
            loggable = [_loggable(r) for r in rows]
            buffer.add(loggable)
            for row in loggable:
                progress.update(row)

        try:
            result = run_stage(
                cfg, stage, data, stage1_artifact=stage1.artifact_uri if stage1 else None,
                on_metrics=on_metrics, run_id=run_id, run_name=trainer_run_name(cfg, stage, digest),
            )
        except BaseException:
            progress.close()
            if buffer.close(timeout_s=0):
                try:
                    _keep_unsent(cfg, stage, digest, run_id, buffer.rows)
                except Exception as exc:  # must not hide the error that ended training
                    log.warning("could not keep %d unsent metric rows: %s", buffer.pending, exc)
            raise
        if buffer.close(cfg.tracking.outage_timeout_s):
            where = _keep_unsent(cfg, stage, digest, run_id, buffer.rows)
            raise TrackingUnreachable(
                f"MLflow tracking store {tracker.safe_uri} stopped answering during {name} and was still away "
                f"after tracking.outage_timeout_s={cfg.tracking.outage_timeout_s:g}s. Training finished: the "
                f"checkpoints are under {storage_root(cfg)} and the artifact at {result.artifact_uri}; the "
                f"metrics MLflow did not get are kept in {where}. Re-run the same command once the server is "
                "back: the stage resumes from its last checkpoint and logs them."
            )
        history = [_loggable(row) for row in result.history]
        resumed = [row for row in carried if not history or row["step"] < history[0]["step"]]
        tracker.log_curves(run_id, resumed + history)
        # The driver's storage retries during the stage; the workers' (rank 0 writes the artifact) and those
        # inside pyarrow's S3 client (shard reads, checkpoint uploads) are not counted (storage.retry_count).
        tracker.log_metrics(run_id, {STORAGE_RETRIES: storage.retry_count() - retries_before})
        tracker.set_tags(run_id, {TAG_ARTIFACT: result.artifact_uri, TAG_CONFIG_HASH: cfg.hash()})
        storage.delete_file(unsent_metrics_uri(cfg, stage, digest), cfg.storage)
        breakdown = format_breakdown(result.history)
        if breakdown is not None:
            say(f"{name}: {breakdown}{_padding_note(cfg, result.history)}")
        say(f"{name}: done, artifact {result.artifact_uri}")
        return StepOutcome(run_id, result.artifact_uri, False, _final_metrics(result), data.digest)


def _padding_note(cfg: DuetConfig, history: list[dict[str, Any]]) -> str:
    """'; 93% of computed tokens real (data.packing: false)': how much of the compute padding took."""
    shares = [row["padding_efficiency"] for row in history if "padding_efficiency" in row]
    if not shares:
        return ""
    return f"; {100 * sum(shares) / len(shares):.0f}% of computed tokens real (data.packing: {str(cfg.data.packing).lower()})"


def _keep_unsent(cfg: DuetConfig, stage: int, digest: str, run_id: str, rows: list[dict[str, float]]) -> str:
    """Save every metric row of this attempt (the sent ones too, so a re-run's run has the whole curve)."""
    uri = unsent_metrics_uri(cfg, stage, digest)
    storage.write_text(uri, json.dumps({"run_id": run_id, "rows": rows}), cfg.storage)
    return uri


def _take_unsent(cfg: DuetConfig, stage: int, digest: str, tracker: Tracker, run_id: str) -> list[dict[str, float]]:
    """Rows an earlier attempt of this stage could not log; the new run is tagged with that attempt's run id."""
    uri = unsent_metrics_uri(cfg, stage, digest)
    if not storage.exists(uri, cfg.storage):
        return []
    try:
        kept = json.loads(storage.read_text(uri, cfg.storage))
        rows = [{k: float(v) for k, v in row.items()} for row in kept["rows"]]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("ignoring unreadable metrics file %s (%s)", uri, exc)
        return []
    tracker.set_tags(run_id, {TAG_CONTINUES_RUN: str(kept.get("run_id", ""))})
    say(f"stage{stage}: logging {len(rows)} steps of metrics kept during a tracking outage ({uri})")
    return rows


def _final_metrics(result: StageResult) -> dict[str, Any]:
    return {k: v for k, v in result.metrics.items() if isinstance(v, int | float)}


def run_single_stage(cfg: DuetConfig, stage: int, stage1_artifact: str | None = None) -> StepOutcome:
    """What pipelines/pretrain.py and finetune.py run: start-up, then one tracked stage.

    Stage 2 starts from `stage1_artifact` (a URI; default this run name's stage-1 artifact), which is
    checked before anything is written or tracked.
    """
    cfg = cfg.with_absolute_paths()
    quiet_driver()
    stage1 = None
    if stage == 2:
        uri = stage1_artifact or artifact_uri(cfg, 1)
        if "://" not in uri:  # workers run elsewhere: a local path must be absolute
            uri = os.path.abspath(uri)
        tracker = Tracker(cfg.tracking, cfg.run.work_dir)
        tracker.check_reachable()
        try:
            stage1 = stage1_lineage(cfg, tracker, uri)
        except ArtifactError as exc:
            if stage1_artifact is None:  # the default: say how to get one
                raise ArtifactError(f"{exc}; run pipelines/pretrain.py with this config first, or pass "
                                    "--stage1-artifact URI") from None
            raise
    with run_lock(cfg):  # after the checks above: a refused config writes nothing
        ws = start(cfg, stages=(stage,))
        data = stage_data(ws.cfg, stage, ws.base_dir)
        with ws.tracker.parent_run(f"{cfg.run.name}-stage{stage}") as parent:
            return tracked_stage(ws.cfg, ws.tracker, parent, stage, data, stage1)
