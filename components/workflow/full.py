"""The full pipeline: data -> stage 1 -> (sweep) -> stage 2 -> evaluations -> register -> gated promotion."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from components.config import ConfigError, DuetConfig
from components.console import say
from components.evaluate.examples import example_rows, examples_text
from components.evaluate.report import DIFFERENCES, comparison_table
from components.evaluate.score import EvalResult
from components.layout import (
    split_uri,
)
from components.locks import run_lock
from components.packaging import log_pyfunc
from components.registry import Registry
from components.tracking.tags import (
    TAG_CONFIG_HASH,
    TAG_MODEL_URI,
    TAG_STAGE1_RUN,
    TAG_STAGE2_RUN,
)
from components.tracking.tracker import Tracker
from components.tune.space import apply_best
from components.tune.sweep import sweep
from components.workflow.evaluation import EVALUATIONS, tracked_evaluation, vision_metrics
from components.workflow.startup import stage_data, start
from components.workflow.steps import StepOutcome
from components.workflow.tracked_stage import tracked_stage


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


def plan_text(cfg: DuetConfig) -> str:
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


def register_and_promote(cfg: DuetConfig, tracker: Tracker, stage2: StepOutcome, metrics: dict[str, float],
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


def run_full(cfg: DuetConfig) -> Summary:
    """Data -> stage 1 -> (sweep) -> stage 2 -> evaluate (zero-shot, fine-tuned, blind) -> register -> promote."""
    cfg = cfg.with_absolute_paths()
    if cfg.data.test_fraction <= 0:
        raise ConfigError("data.test_fraction is 0: the pipeline evaluates on a held-out test split before it "
                          "promotes a model; set data.test_fraction > 0 (e.g. 0.05)")
    say("plan:\n" + plan_text(cfg))
    with run_lock(cfg):  # after the checks above: a refused config writes nothing
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
            tracker.set_tags(parent, {TAG_STAGE1_RUN: stage1.run_id, TAG_STAGE2_RUN: stage2.run_id})
        say("metrics on the held-out test split:\n" + comparison_table(evaluations, DIFFERENCES))
        fine_tuned = evaluations["fine-tuned"].per_sample
        if fine_tuned is not None:
            blind_table = evaluations["blind"].per_sample if "blind" in evaluations else None
            say("held-out examples (fine-tuned model):\n" + examples_text(example_rows(fine_tuned), blind_table))
        say("summary:\n" + summary_text(cfg2, summary, tracker))
        return summary


def summary_text(cfg: DuetConfig, summary: Summary, tracker: Tracker) -> str:
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
