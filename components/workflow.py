"""The steps of the pipeline and how they connect: start-up, data, base model, stages, tracking.

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
import tempfile
from dataclasses import dataclass
from typing import Any

import pandas as pd
from transformers import LlavaConfig

from components import storage
from components.cluster import check_fits, init_ray, pipeline_needs
from components.config import ConfigError, PipelineConfig
from components.console import CountProgress, StepProgress, quiet_libraries, say
from components.data.prepare import SplitResult, prepare, split_uri
from components.data.shards import read_manifest, shard_uris
from components.errors import ArtifactError
from components.evaluate import DIFFERENCES, EvalResult, comparison_table, evaluate, write_table
from components.examples import example_grid, example_rows, examples_text, read_images
from components.model.mllm import check_compatible, local_checkpoint
from components.model.tiny import save_tiny_checkpoint
from components.packaging import log_pyfunc
from components.registry import Registry
from components.tracking import (
    TAG_ARTIFACT,
    TAG_CONFIG_HASH,
    TAG_CONTINUES_RUN,
    TAG_DATASET_DIGEST,
    TAG_MODEL_URI,
    TAG_STEP,
    TAG_STEP_HASH,
    MetricsBuffer,
    Tracker,
    TrackingUnreachable,
)
from components.train.deepspeed import plan_batch
from components.train.settings import VAL_MEASURED, stage_config, total_steps
from components.train.stage import STAGE_SPLITS, StageData, StageResult, artifact_uri, run_stage, storage_root
from components.tune import SweepResult, apply_best, check_sweepable, default_output, format_trials, sweep

log = logging.getLogger("duet")


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


# ---------------------------------------------------------------- start-up


@dataclass
class Workspace:
    """What every entry point needs before its first stage: the resolved config, the tracker, data, base."""

    cfg: PipelineConfig
    tracker: Tracker
    splits: dict[str, SplitResult]
    base_dir: str
    base_reused: bool


def start(cfg: PipelineConfig, stages: tuple[int, ...] = (1, 2)) -> Workspace:
    """The start-up every pipeline shares, cheapest checks first, so nothing is trained before all pass.

    Config paths made absolute; the tracking store answering (before Ray starts: an outage must not
    cost a cluster start or a stage); Ray joined or started; every step fitting the cluster at once;
    the dataset written or reused; each stage's data filling at least one global batch; the base
    model found, downloaded or (tiny) built.
    """
    cfg = cfg.with_absolute_paths()
    quiet_libraries()
    tracker = Tracker(cfg.tracking, cfg.run.work_dir)
    tracker.check_reachable()
    say(init_ray(cfg))
    check_fits(pipeline_needs(cfg, has_validation=cfg.data.val_fraction > 0))
    splits = ensure_dataset(cfg)
    for stage in stages:
        split = splits.get(STAGE_SPLITS[stage])
        if split is not None:
            total_steps(stage_config(cfg, stage), split.manifest.count)
    base_dir, reused = ensure_base_model(cfg, splits)
    try:  # a checkpoint in object storage is read only now: its vision tower decides the VCE layers
        cfg.vce.check_layers(LlavaConfig.from_pretrained(base_dir).vision_config.num_hidden_layers,
                             f" of {cfg.model.checkpoint}")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return Workspace(cfg, tracker, splits, base_dir, reused)


# ---------------------------------------------------------------- data and base model


def ensure_dataset(cfg: PipelineConfig) -> dict[str, SplitResult]:
    """Write the dataset's splits, re-using every split whose manifest already matches its inputs."""
    results = {r.split: r for r in prepare(cfg.data, cfg.storage, progress=say)}
    for result in results.values():
        state = "reused" if result.reused else "written"
        say(f"data {result.split}: {result.manifest.count} records, digest {result.manifest.digest[:12]} ({state})")
    return results


def ensure_base_model(cfg: PipelineConfig, splits: dict[str, SplitResult]) -> tuple[str, bool]:
    """The base checkpoint directory and whether it already existed; `model.arch: tiny` is built when missing."""
    if cfg.model.arch != "tiny" or storage.is_remote(cfg.model.checkpoint or ""):
        return local_checkpoint(cfg.model.checkpoint or "", cfg.storage), True
    path = storage.resolve(cfg.model.checkpoint or "")[1]
    if os.path.isfile(os.path.join(path, "config.json")):
        say(f"base model: {path} (reused)")
        return path, True
    texts = _warmup_texts(cfg, splits)
    say(f"base model: building the tiny LLaVA at {path} ({cfg.model.tiny.warmup_steps} warm-up steps on "
        f"{len(texts)} texts)")
    return save_tiny_checkpoint(cfg.model.tiny, path, texts, seed=cfg.run.seed), False


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
    """A finished step: its MLflow run (None when the store does not hold it), artifact and final metrics."""

    run_id: str | None
    artifact_uri: str
    reused: bool
    metrics: dict[str, Any]
    data_digest: str | None = None


def stage1_lineage(cfg: PipelineConfig, tracker: Tracker, uri: str) -> StepOutcome:
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
                return StepOutcome(done.info.run_id, uri, True, dict(done.data.metrics), data.digest)
    with tracker.child_run("stage", name, parent_run_id, tags={TAG_STEP_HASH: digest}) as run_id:
        tracker.log_config(run_id, cfg)
        tracker.log_dataset(run_id, f"{cfg.data.name}/{STAGE_SPLITS[stage]}", data.train_uri, data.digest)
        tracker.set_tags(run_id, {TAG_DATASET_DIGEST: data.digest})
        if stage1 is not None:
            tracker.tag_lineage(run_id, stage1.run_id, stage1.artifact_uri, data.digest, stage1.data_digest)

        carried = _take_unsent(cfg, stage, digest, tracker, run_id)
        buffer = MetricsBuffer(tracker, run_id)
        buffer.add(carried)
        stage_cfg = stage_config(cfg, stage)
        plan = plan_batch(stage_cfg, cfg.scaling.num_workers)
        say(f"{name}: training {total_steps(stage_cfg, data.num_train_samples)} steps on {plan.world_size} workers "
            f"(global batch {plan.global_batch} = {plan.world_size} x micro-batch {plan.micro_batch} x "
            f"accumulation {plan.accumulation}), ZeRO-{cfg.deepspeed.zero_stage}")
        progress = StepProgress(name, stage_cfg.log_every)
        heard: list[int] = []  # steps the driver has heard of in this attempt

        def on_metrics(rows: list[dict[str, Any]]) -> None:
            loggable = [_loggable(r) for r in rows]
            if loggable and not heard and loggable[0]["step"] > 1:
                say(f"{name}: resumed from checkpoint at step {int(loggable[0]['step']) - 1}")
            heard.extend(int(r["step"]) for r in loggable)
            buffer.add(loggable)
            for row in loggable:
                progress.update(row)

        try:
            result = run_stage(
                cfg, stage, data, stage1_artifact=stage1.artifact_uri if stage1 else None,
                on_metrics=on_metrics, run_id=run_id,
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
        tracker.set_tags(run_id, {TAG_ARTIFACT: result.artifact_uri, TAG_CONFIG_HASH: cfg.hash()})
        storage.delete_file(unsent_metrics_uri(cfg, stage, digest), cfg.storage)
        say(f"{name}: done, artifact {result.artifact_uri}")
        return StepOutcome(run_id, result.artifact_uri, False, _final_metrics(result), data.digest)


def unsent_metrics_uri(cfg: PipelineConfig, stage: int, digest: str) -> str:
    """Where a stage keeps its metrics when the tracking store was away, until a re-run logs them."""
    return storage.join(storage_root(cfg), cfg.run.name, stage_config(cfg, stage).name, f"unsent-metrics-{digest}.json")


def _keep_unsent(cfg: PipelineConfig, stage: int, digest: str, run_id: str, rows: list[dict[str, float]]) -> str:
    """Save every metric row of this attempt (the sent ones too, so a re-run's run has the whole curve)."""
    uri = unsent_metrics_uri(cfg, stage, digest)
    storage.write_text(uri, json.dumps({"run_id": run_id, "rows": rows}), cfg.storage)
    return uri


def _take_unsent(cfg: PipelineConfig, stage: int, digest: str, tracker: Tracker, run_id: str) -> list[dict[str, float]]:
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


def run_single_stage(cfg: PipelineConfig, stage: int, stage1_artifact: str | None = None) -> StepOutcome:
    """What pipelines/pretrain.py and finetune.py run: start-up, then one tracked stage.

    Stage 2 starts from `stage1_artifact` (a URI; default this run name's stage-1 artifact), which is
    checked before anything is written or tracked.
    """
    cfg = cfg.with_absolute_paths()
    quiet_libraries()
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
    ws = start(cfg, stages=(stage,))
    data = stage_data(ws.cfg, stage, ws.base_dir)
    with ws.tracker.parent_run(f"{cfg.run.name}-stage{stage}") as parent:
        return tracked_stage(ws.cfg, ws.tracker, parent, stage, data, stage1)


# ---------------------------------------------------------------- the full pipeline


@dataclass
class Summary:
    """What the full pipeline did: for the closing table and for tests."""

    steps: list[tuple[str, str, str]]  # (step, reused|ran, detail)
    parent_run_id: str = ""
    stage1: StepOutcome | None = None
    stage2: StepOutcome | None = None
    evaluations: dict[str, Any] | None = None
    model_version: str | None = None
    decision: Any = None
    best_config: str | None = None

    def record(self, step: str, reused: bool, detail: str) -> None:
        self.steps.append((step, "reused" if reused else "ran", detail))


def plan_text(cfg: PipelineConfig) -> str:
    """The steps full.py will take, printed before any work."""
    sweep_line = f"sweep ({cfg.tune.num_samples} trials, {cfg.tune.search}, ASHA on {cfg.tune.metric})" \
        if cfg.tune.enabled else "sweep: off (tune.enabled=false)"
    lines = [
        f"run {cfg.run.name!r}: {cfg.model.arch} model, adapter {cfg.adapter.type} r={cfg.adapter.r} "
        f"alpha={cfg.adapter.alpha}, VCE {'on' if cfg.vce.enabled else 'off'}, "
        f"{cfg.scaling.num_workers} workers, ZeRO-{cfg.deepspeed.zero_stage}; work dir {cfg.run.work_dir}",
        f"  1. data      {cfg.data.source} -> {split_uri(cfg.data, 'train').rsplit('/', 1)[0]}",
        f"  2. base      {cfg.model.checkpoint}",
        f"  3. stage 1   VCE + projector, lr {cfg.stage1.lr}, global batch {cfg.stage1.global_batch}",
        f"  4. {sweep_line}",
        f"  5. stage 2   + {cfg.adapter.type}, adapter lr {cfg.stage2.adapter_lr}, lr {cfg.stage2.lr}, "
        f"global batch {cfg.stage2.global_batch}",
        "  6. evaluate  zero-shot (stage-1 model), fine-tuned"
        + (" and blind (fine-tuned, images blanked)" if cfg.eval.blind_baseline else "") + " on the test split",
        f"  7. register  {cfg.registry.model_name}, promote to @{cfg.registry.alias} if {cfg.registry.metric} "
        f"beats it ({cfg.registry.direction}, margin {cfg.registry.min_margin})",
    ]
    return "\n".join(lines)


# The evaluations of the full pipeline: (name, which stage's model, images blanked).
EVALUATIONS = (("zero-shot", 1, False), ("fine-tuned", 2, False), ("blind", 2, True))
COUNT_PREFIX = "count/"


def tracked_evaluation(
    cfg: PipelineConfig, tracker: Tracker, parent_run_id: str, name: str, model_uri: str, base_dir: str,
    test: SplitResult, lineage: StepOutcome, blind: bool = False,
) -> tuple[str, EvalResult, bool]:
    """Evaluate one model on the test split as a child run; reused when the same model and data were scored.

    A reused evaluation gives back its metrics, counts and (when the local copy is still there) its
    per-sample table; `blind` blanks every image (the blind baseline).
    """
    digest = step_hash(cfg, "evaluate", model=model_uri, data=test.manifest.digest, blind=blind)
    table_path = os.path.join(cfg.run.work_dir, "eval", f"{name}-{digest}.csv")
    done = tracker.find_run({TAG_STEP: f"evaluate-{name}", TAG_STEP_HASH: digest})
    if done is not None:
        say(f"evaluate {name}: reused run {done.info.run_id}")
        logged = done.data.metrics
        metrics = {k: v for k, v in logged.items() if not k.startswith(COUNT_PREFIX)}
        counts = {k.removeprefix(COUNT_PREFIX): int(v) for k, v in logged.items() if k.startswith(COUNT_PREFIX)}
        table = (pd.read_csv(table_path, keep_default_na=False, dtype={"key": str, "id": str, "prediction": str})
                 if os.path.isfile(table_path) else None)
        return done.info.run_id, EvalResult(metrics, table, counts), True  # type: ignore[arg-type]
    with tracker.child_run("evaluation", f"evaluate-{name}", parent_run_id, tags={TAG_STEP_HASH: digest}) as run_id:
        tracker.log_dataset(run_id, f"{cfg.data.name}/test", test.uri, test.manifest.digest, context="evaluation")
        tags = {"duet.evaluated_model": model_uri, "duet.blind": str(blind).lower()}
        if lineage.run_id:
            tags["duet.model_stage_run_id"] = lineage.run_id
        tracker.set_tags(run_id, tags)
        total = min(test.manifest.count, cfg.eval.max_samples or test.manifest.count)
        what = "every image blanked, " if blind else ""
        say(f"evaluate {name}: generating on {total} test samples ({what}{cfg.eval.num_replicas} replica(s))")
        result = evaluate(cfg, model_uri, test.uri, base_dir, blind=blind,
                          progress=CountProgress(f"evaluate {name}", total).update)
        tracker.log_metrics(run_id, result.metrics)
        tracker.log_metrics(run_id, {f"{COUNT_PREFIX}{k}": float(v) for k, v in result.counts.items()})
        os.makedirs(os.path.dirname(table_path), exist_ok=True)
        write_table(result.per_sample, table_path)
        tracker.client.log_artifact(run_id, table_path, "predictions")
        if not blind:
            _log_examples(cfg, tracker, run_id, name, test, result.per_sample)
        return run_id, result, False


def _log_examples(cfg: PipelineConfig, tracker: Tracker, run_id: str, name: str, test: SplitResult,
                  table: pd.DataFrame) -> None:
    """A PNG grid of held-out images with their reference and predicted answers, on the evaluation's run."""
    rows = example_rows(table)
    if rows.empty:
        return
    images = read_images(test.uri, set(rows["key"]), cfg.storage)
    with tempfile.TemporaryDirectory() as tmp:
        path = example_grid(rows, images, os.path.join(tmp, "examples.png"),
                            f"{name}: held-out test examples ({cfg.data.name})")
        tracker.client.log_artifact(run_id, path, "examples")


def vision_metrics(fine_tuned: EvalResult, blind: EvalResult) -> dict[str, float]:
    """Fine-tuned minus blind for every metric both have (`vision/score`, ...): what comes from the pictures.

    Registered with the model version, so `registry.metric: vision/score` can gate on it.
    """
    return {f"vision/{k}": v - blind.metrics[k] for k, v in fine_tuned.metrics.items() if k in blind.metrics}


def register_and_promote(cfg: PipelineConfig, tracker: Tracker, stage2: StepOutcome, metrics: dict[str, float],
                         summary: Summary) -> None:
    """Package the fine-tuned model into its stage-2 run (once), register a version (once), run the gate."""
    registry = Registry(tracker, cfg.registry)
    existing = tracker.client.search_model_versions(
        f"name='{cfg.registry.model_name}' and run_id='{stage2.run_id}'"
    )
    if existing:
        version = max(existing, key=lambda v: int(v.version))
        say(f"register: reused {cfg.registry.model_name} version {version.version}")
        summary.record("register", True, f"version {version.version}")
    else:
        run = tracker.client.get_run(stage2.run_id)
        if TAG_MODEL_URI not in run.data.tags:
            model_uri = log_pyfunc(cfg, stage2.artifact_uri, stage2.run_id)
            tracker.set_tags(stage2.run_id, {TAG_MODEL_URI: model_uri})
        version = registry.register(stage2.run_id, "model", metrics=metrics)
        say(f"register: {cfg.registry.model_name} version {version.version}")
        summary.record("register", False, f"version {version.version}")
    summary.model_version = str(version.version)
    decision = registry.promote(version.version)
    summary.decision = decision
    summary.record("promote", False, decision.verdict)
    say(f"promote: {decision}")


def run_full(cfg: PipelineConfig) -> Summary:
    """Data -> stage 1 -> (sweep) -> stage 2 -> evaluate (zero-shot, fine-tuned, blind) -> register -> promote."""
    cfg = cfg.with_absolute_paths()
    if cfg.data.test_fraction <= 0:
        raise ConfigError("data.test_fraction is 0: the pipeline evaluates on a held-out test split before it "
                          "promotes a model; set data.test_fraction > 0 (e.g. 0.05)")
    say("plan:\n" + plan_text(cfg))
    ws = start(cfg)
    cfg, tracker, splits, base_dir = ws.cfg, ws.tracker, ws.splits, ws.base_dir
    summary = Summary(steps=[])
    summary.record("data", all(s.reused for s in splits.values()),
                   ", ".join(f"{k}={v.manifest.count}" for k, v in splits.items()))
    summary.record("base model", ws.base_reused, base_dir)
    if "test" not in splits:
        raise ConfigError(f"dataset {cfg.data.name!r} has no test split (too few records for data.test_fraction="
                          f"{cfg.data.test_fraction}): add records or raise data.test_fraction")
    with tracker.parent_run(cfg.run.name, tags={TAG_CONFIG_HASH: cfg.hash()}) as parent:
        summary.parent_run_id = parent
        tracker.log_config(parent, cfg)
        stage1 = tracked_stage(cfg, tracker, parent, 1, stage_data(cfg, 1, base_dir))
        summary.stage1 = stage1
        summary.record("stage 1", stage1.reused, f"run {stage1.run_id}")
        cfg2 = cfg
        if cfg.tune.enabled:
            result = sweep(cfg, stage_data(cfg, 2, base_dir), stage1.artifact_uri, tracker, parent,
                           stage1_run_id=stage1.run_id)
            summary.best_config = result.best_config_path
            cfg2 = apply_best(cfg, result.best_params)
            summary.record("sweep", False, f"best config {result.best_config_path}")
        stage2 = tracked_stage(cfg2, tracker, parent, 2, stage_data(cfg2, 2, base_dir), stage1=stage1)
        summary.stage2 = stage2
        summary.record("stage 2", stage2.reused, f"run {stage2.run_id}")
        evaluations: dict[str, EvalResult] = {}
        for name, stage, blind in EVALUATIONS:
            if blind and not cfg2.eval.blind_baseline:
                continue
            outcome = stage1 if stage == 1 else stage2
            run_id, evaluated, reused = tracked_evaluation(
                cfg2, tracker, parent, name, outcome.artifact_uri, base_dir, splits["test"], outcome, blind=blind
            )
            evaluations[name] = evaluated
            summary.record(f"evaluate {name}", reused,
                           f"run {run_id}, score {evaluated.metrics.get('score', 0):.2f}")
        summary.evaluations = evaluations
        registered = dict(evaluations["fine-tuned"].metrics)
        if "blind" in evaluations:
            registered |= vision_metrics(evaluations["fine-tuned"], evaluations["blind"])
        register_and_promote(cfg2, tracker, stage2, registered, summary)
        tracker.set_tags(parent, {"duet.stage1_run_id": stage1.run_id, "duet.stage2_run_id": stage2.run_id})
    say("metrics on the held-out test split:\n" + comparison_table(evaluations, DIFFERENCES))
    fine_tuned = evaluations["fine-tuned"].per_sample
    if fine_tuned is not None:
        blind_table = evaluations["blind"].per_sample if "blind" in evaluations else None
        say("held-out examples (fine-tuned model):\n" + examples_text(example_rows(fine_tuned), blind_table))
    say("summary:\n" + summary_text(cfg2, summary, tracker))
    return summary


def summary_text(cfg: PipelineConfig, summary: Summary, tracker: Tracker) -> str:
    width = max(len(step) for step, _, _ in summary.steps)
    lines = [f"  {step.ljust(width)}  {state:<6}  {detail}" for step, state, detail in summary.steps]
    if summary.stage1 and summary.stage2:
        lines += [f"  stage-1 artifact: {summary.stage1.artifact_uri}",
                  f"  stage-2 artifact: {summary.stage2.artifact_uri}"]
    if summary.decision is not None:
        lines.append(f"  {cfg.registry.model_name} v{summary.model_version}: {summary.decision.verdict}")
    lines.append(f"  parent run {summary.parent_run_id} in {tracker.safe_uri}")
    if tracker.uri.startswith("sqlite:"):
        lines.append(f"  browse it: mlflow ui --backend-store-uri {tracker.uri}")
    return "\n".join(lines)


# ---------------------------------------------------------------- the sweep


def run_sweep(cfg: PipelineConfig, output: str | None = None) -> SweepResult:
    """What pipelines/sweep.py runs: start-up, stage 1 (or its reuse), the Tune sweep, the trials table."""
    cfg = cfg.with_absolute_paths()  # trials and their workers run in other directories
    check_sweepable(cfg)  # every corner of the space must validate before any work
    output = output or default_output(cfg)
    say(f"sweep: {cfg.tune.num_samples} trials over tune.space, best config to {output}")
    ws = start(cfg)
    with ws.tracker.parent_run(f"{cfg.run.name}-sweep") as parent:
        ws.tracker.log_config(parent, ws.cfg)
        stage1 = tracked_stage(ws.cfg, ws.tracker, parent, 1, stage_data(ws.cfg, 1, ws.base_dir))
        result = sweep(ws.cfg, stage_data(ws.cfg, 2, ws.base_dir), stage1.artifact_uri, ws.tracker, parent,
                       output=output, stage1_run_id=stage1.run_id)
    print(format_trials(result.trials, cfg.tune.metric, result.total_steps))
    say(f"best trial {result.best_trial_id}: {cfg.tune.metric} {result.best_metrics.get(cfg.tune.metric)}")
    say(f"best config: {result.best_config_path}")
    if result.best_artifact_uri:
        say(f"best stage-2 artifact: {result.best_artifact_uri}")
    say(f"Tune experiment: {result.experiment_path}")
    return result
