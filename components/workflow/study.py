"""What pipelines/study.py runs: a method study, variants x seeds as Ray Tune trials, published as tables.

Order: the study resolved and every variant validated (before Ray starts); the shared start-up (data,
base model); one MLflow parent run per study (re-opened when the study runs again); one stage 1 per
stage-1 group (VCE setting and seed), reused by step hash; the trials not finished yet as a Tune grid
(no early stopping, as many side by side as the cluster holds); then the table, CSV and (when the
study asks) Figure 5 from the finished trial runs, written under the work dir and logged to the parent.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import ray
from ray import tune
from ray.tune.search import BasicVariantGenerator

from components import storage
from components.cluster import check_fits, use_gpu_for_training
from components.config import DuetConfig, config_from_dict
from components.console import say
from components.errors import DuetError
from components.layout import storage_root, study_dir
from components.locks import run_lock
from components.quiet import quiet_tune
from components.study.figure import figure_5
from components.study.results import StudyTable, Trial, summarise, to_csv, to_markdown
from components.study.spec import ResolvedStudy, resolve_study, stage1_key
from components.study.trials import (
    TrialPlan,
    adapter_mib,
    find_finished,
    run_study_trial,
    trial_from_run,
    trial_hash,
    trial_resources,
)
from components.tracking.tags import PIPELINE_KIND, TAG_CONFIG_HASH, TAG_KIND, TAG_STUDY, TAG_STUDY_RUN
from components.tracking.tracker import Tracker
from components.tune.sweep import concurrent_trials, trial_need, trials_in_working_dir
from components.workflow.startup import Workspace, stage_data, start
from components.workflow.steps import StepOutcome
from components.workflow.tracked_stage import tracked_stage


class StudyError(DuetError, RuntimeError):
    """Trials of a study that did not finish; the message names them and says that a re-run retries them."""


@dataclass
class StudyOutcome:
    """What a study run did: for the CLI's closing lines and for tests."""

    name: str
    parent_run_id: str
    table: StudyTable
    trials: list[Trial]
    reused: list[str] = field(default_factory=list)  # plan names whose finished trial run was reused
    trained: list[str] = field(default_factory=list)  # plan names trained by this invocation
    markdown_path: str = ""
    csv_path: str = ""
    figure_path: str | None = None


def run_study(cfg: DuetConfig, name: str | None = None) -> StudyOutcome:
    """Resolve, train what is missing, publish. A config error in any variant stops it before any work."""
    cfg = cfg.with_absolute_paths()
    resolved = resolve_study(cfg, name)  # every variant's config validated before Ray starts
    say(plan_text(resolved))
    with run_lock(cfg):  # after the checks above: a refused config writes nothing
        ws = start(cfg)
        tracker = ws.tracker
        parent_tags = {TAG_STUDY: resolved.name, TAG_STUDY_RUN: cfg.run.name}
        previous = tracker.find_run({**parent_tags, TAG_KIND: PIPELINE_KIND}, finished_only=False)
        with tracker.parent_run(f"{cfg.run.name}-study-{resolved.name}", tags=parent_tags,
                                run_id=previous.info.run_id if previous else None) as parent:
            tracker.set_tags(parent, {TAG_CONFIG_HASH: cfg.hash()})
            plans = trial_plans(resolved, ws, tracker, parent)
            finished = {plan.name: find_finished(tracker, plan) for plan in plans}
            reused = [plan.name for plan in plans if finished[plan.name] is not None]
            pending = [plan for plan in plans if finished[plan.name] is None]
            say(f"study {resolved.name}: {len(plans)} trials, {len(reused)} finished earlier (reused), "
                f"{len(pending)} to train")
            errors = _run_trials(ws.cfg, pending, parent) if pending else {}
            trials, missing = [], []
            for plan in plans:  # the trials this invocation trained are looked up once they have run
                run = finished[plan.name] or find_finished(tracker, plan)
                if run is None:
                    missing.append(plan.name)
                else:
                    trials.append(trial_from_run(plan, run))
            if not trials:
                raise StudyError(f"study {resolved.name}: no trial finished ({_failures(missing, errors)}); re-run "
                                 "the same command to retry")
            outcome = publish(ws.cfg, resolved, tracker, parent, trials)
            outcome.reused, outcome.trained = reused, [p.name for p in pending if p.name not in missing]
        print(to_markdown(outcome.table, metrics=headline_metrics(outcome.table)))
        say(f"study {resolved.name}: table {outcome.markdown_path}, CSV {outcome.csv_path}"
            + (f", Figure 5 {outcome.figure_path}" if outcome.figure_path else ""))
        say(f"  parent run {parent} in {tracker.safe_uri}")
        if missing:
            raise StudyError(f"study {resolved.name}: {len(missing)} of {len(plans)} trials did not finish "
                             f"({_failures(missing, errors)}); the table above holds the others. Re-run the same "
                             "command: finished trials are reused, the rest are trained again.")
        return outcome


# What the CLI prints: the overall score and each task's headline metric (by its last path part);
# table.md and table.csv hold every metric.
HEADLINE_PARTS = ("f1", "iou", "rouge_l", "pmae", "accuracy")


def headline_metrics(table: StudyTable) -> list[str]:
    """`score` and each task's headline metric (`items/f1`, `numeric/pmae`, ...), in the table's order."""
    chosen = [m for m in table.metric_names if m == "score" or m.rsplit("/", 1)[-1] in HEADLINE_PARTS]
    return chosen or list(table.metric_names)


def plan_text(resolved: ResolvedStudy) -> str:
    """The study's plan, printed before any work."""
    spec = resolved.spec
    lines = [f"study {resolved.name!r}: {len(resolved.variants)} variants x {spec.seeds} seeds "
             f"(seeds {', '.join(map(str, resolved.seeds))}), stage 2 trains "
             f"{'the adapter alone' if resolved.adapter_only else 'adapter + projector + VCE'}, "
             f"compared with {resolved.reference!r}"]
    for variant, variant_cfg in resolved.variants.items():
        a = variant_cfg.adapter
        lines.append(f"  {variant:<20} {a.type} r={a.r} alpha={a.alpha:g}, VCE {'on' if variant_cfg.vce.enabled else 'off'}")
    return "\n".join(lines)


def _run_name(cfg: DuetConfig, study: str, part: str, digest: str) -> DuetConfig:
    """The config with a run name of its own, so trials never share checkpoint or artifact folders (run.name
    is not part of any step hash, so reuse is unchanged)."""
    tree = cfg.model_dump(mode="json")
    tree["run"]["name"] = f"{cfg.run.name}-{study}-{part}-{digest[:8]}"
    return config_from_dict(tree)


def trial_plans(resolved: ResolvedStudy, ws: Workspace, tracker: Tracker, parent: str) -> list[TrialPlan]:
    """Stage 1 for every stage-1 group (run or reused), then one plan per trial, in the study's order."""
    test = ws.splits["test"]
    stage1_by_key: dict[str, StepOutcome] = {}
    sizes: dict[str, float] = {}
    plans = []
    for trial in resolved.trials:
        key = stage1_key(trial.config)
        if key not in stage1_by_key:
            cfg1 = _run_name(trial.config, resolved.name, f"stage1-seed{trial.seed}", key)
            stage1_by_key[key] = tracked_stage(cfg1, tracker, parent, 1, stage_data(cfg1, 1, ws.base_dir))
        stage1 = stage1_by_key[key]
        data = stage_data(trial.config, 2, ws.base_dir)
        digest = trial_hash(trial.config, data, stage1.artifact_uri, test)
        cfg2 = _run_name(trial.config, resolved.name, f"{trial.variant}-seed{trial.seed}", digest)
        if trial.variant not in sizes:
            sizes[trial.variant] = adapter_mib(cfg2)
        plans.append(TrialPlan(resolved.name, trial.variant, trial.seed, cfg2.model_dump(mode="json"), stage1, data,
                               test, ws.base_dir, digest, sizes[trial.variant]))
    return plans


def _run_trials(cfg: DuetConfig, plans: list[TrialPlan], parent: str) -> dict[str, str]:
    """The pending trials as a Tune grid, as many at a time as the cluster holds; errors by plan name."""
    first = config_from_dict(plans[0].config)
    need = trial_need(first, use_gpu_for_training(first), has_validation=bool(plans[0].data.val_uri))
    check_fits([need])
    concurrency = concurrent_trials(need.resources, ray.cluster_resources(), cfg.tune.max_concurrent)
    shown = ", ".join(f"{v:g} {k}" for k, v in need.resources.items())
    say(f"trials: {len(plans)} to train, each holding {shown}: {concurrency} at a time")
    experiment = f"{cfg.run.name}-study-{plans[0].study}-{time.strftime('%Y%m%d-%H%M%S')}"
    fs, fs_root = storage.resolve(storage_root(cfg), cfg.storage)
    trainable = tune.with_resources(
        tune.with_parameters(run_study_trial, plans=plans, parent_run_id=parent),
        trial_resources(cfg.tune.trial_driver_cpus),
    )
    tuner = tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(list(range(len(plans))))},
        tune_config=tune.TuneConfig(search_alg=BasicVariantGenerator(max_concurrent=concurrency)),
        run_config=tune.RunConfig(name=experiment, storage_path=fs_root, storage_filesystem=fs, verbose=0),
    )
    with trials_in_working_dir(), quiet_tune():
        grid = tuner.fit()
    errors = {}
    for result in grid:
        if result.error is not None:
            index = (result.config or {}).get("trial")
            label = plans[index].name if isinstance(index, int) else "a trial"
            errors[label] = f"{type(result.error).__name__}: {str(result.error).splitlines()[0][:300]}"
    return errors


def _failures(missing: list[str], errors: dict[str, str]) -> str:
    return "; ".join(f"{name}: {errors.get(name, 'not finished')}" for name in missing)


def publish(cfg: DuetConfig, resolved: ResolvedStudy, tracker: Tracker, parent: str,
            trials: list[Trial]) -> StudyOutcome:
    """Table (Markdown and CSV) and, when the study asks, Figure 5: under the work dir and on the parent run."""
    table = summarise(trials, resolved.reference, order=list(resolved.variants),
                      compare_with=resolved.spec.compare_with)
    folder = study_dir(cfg, resolved.name)
    os.makedirs(folder, exist_ok=True)
    markdown = to_markdown(table)
    if resolved.spec.description:
        markdown = f"{resolved.spec.description.strip()}\n\n{markdown}"
    markdown_path = os.path.join(folder, "table.md")
    with open(markdown_path, "w") as out:
        out.write(markdown + "\n")
    csv_path = str(to_csv(table, os.path.join(folder, "table.csv")))
    figure_path = str(figure_5(trials, os.path.join(folder, "figure5.png"))) if resolved.spec.figure else None
    for path in (markdown_path, csv_path, figure_path):
        if path:
            tracker.client.log_artifact(parent, path, "study")
    _log_headline(tracker, parent, table)
    return StudyOutcome(resolved.name, parent, table, trials, markdown_path=markdown_path, csv_path=csv_path,
                        figure_path=figure_path)


def _log_headline(tracker: Tracker, parent: str, table: StudyTable) -> None:
    """Each variant's mean score on the parent run (`score/<variant>`), so runs can be compared in the UI."""
    metrics: dict[str, Any] = {}
    for row in table.rows:
        if "score" in row.metrics:
            metrics[f"score/{row.variant}"] = row.metrics["score"].mean
    if metrics:
        tracker.log_metrics(parent, metrics)

