"""The sweep driver: ASHA over stage-2 runs (adapter rank, alpha/r, learning rates) from one stage-1 artifact.

Each trial is one stage-2 run (`run_stage`, a TorchTrainer with its own workers) inside a Tune
function trainable. Rank 0's per-step reports reach Tune through `TuneReportCallback`; ASHA
compares trials at its rungs on `tune.metric` and stops the weak ones. The best completed trial's
config is written as YAML that the stage-2 pipeline accepts as it is (`--config best.yaml`).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import ray
from ray import tune
from ray.train.constants import RAY_CHDIR_TO_TRIAL_DIR
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import BasicVariantGenerator

from components import storage
from components.cluster import Need, check_fits, on_this_node, stage_need, use_gpu_for_training
from components.config import DuetConfig, config_from_dict, dump_config
from components.console import say
from components.errors import DuetError
from components.layout import best_config_path, storage_root, sweep_artifact_root, trial_artifact_uri
from components.quiet import quiet_ray_data
from components.tracking.tags import TAG_SWEEP_BEST_RUN, TAG_SWEEP_BEST_TRIAL, TAG_SWEEP_EXPERIMENT_PATH
from components.tracking.tracker import Tracker
from components.train.settings import total_steps
from components.train.stage import StageData, run_stage
from components.tune.ledger import TrialLedger, TrialRow, training_metrics
from components.tune.placement import PlacementGroupReaper, ReportPlacementGroup, release
from components.tune.space import SEARCH_PARAMS, apply_best, check_sweepable, search_space


class SweepError(DuetError, RuntimeError):
    """A sweep that cannot produce a best config; the message says which trials failed and why."""


def trial_need(cfg: DuetConfig, use_gpu: bool, has_validation: bool) -> Need:
    """What one trial holds: its driver, its training workers and their data preprocessing."""
    stage = stage_need(cfg, 2, has_validation, use_gpu)
    resources = dict(stage.resources)
    resources["CPU"] = resources["CPU"] + cfg.tune.trial_driver_cpus
    return Need("one sweep trial", resources,
                f"its driver {cfg.tune.trial_driver_cpus:g} CPU (tune.trial_driver_cpus) + {stage.breakdown}")


def trial_resources(cfg: DuetConfig, use_gpu: bool, has_validation: bool) -> dict[str, float]:
    """The resources of `trial_need`, as Tune's concurrency arithmetic takes them."""
    return trial_need(cfg, use_gpu, has_validation).resources


def concurrent_trials(need: Mapping[str, float], cluster: Mapping[str, float], cap: int | None) -> int:
    """How many trials fit side by side (at least one: an autoscaler may add nodes), capped by `cap`."""
    fits = min(
        (int(cluster.get(resource, 0.0) / amount + 1e-9) for resource, amount in need.items() if amount > 0),
        default=1,
    )
    return max(1, min(fits, cap) if cap is not None else fits)


@dataclass
class SweepResult:
    best_config_path: str
    best_trial_id: str
    best_params: dict[str, Any]
    best_metrics: dict[str, float]
    best_artifact_uri: str | None
    trials: list[TrialRow] = field(default_factory=list)
    experiment_path: str = ""
    total_steps: int = 0


def format_trials(rows: list[TrialRow], metric: str, total: int) -> str:
    """The trials table as fixed-width text (printed by the sweep pipeline, logged to the parent run)."""
    header = ["trial", *SEARCH_PARAMS, metric, "steps", "status", "early-stopped", "mlflow run"]
    lines = [header]
    for row in rows:
        params = [_fmt(row.params.get(p)) for p in SEARCH_PARAMS]
        lines.append([
            row.trial_id, *params, _fmt(row.metric), f"{row.steps}/{total}", row.status,
            "yes" if row.early_stopped else "no", row.run_id or "-",
        ])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def run_trial(
    config: dict[str, Any], *, base: dict[str, Any], data: StageData, stage1_artifact: str, artifact_root: str,
    reaper: Any,
) -> None:
    """One Tune trial: the base config plus the sampled point, trained as a stage-2 run."""
    quiet_ray_data()  # this process builds the trial's datasets: no per-block progress bars in the job log
    cfg = apply_best(config_from_dict(base), {k: config[k] for k in SEARCH_PARAMS if k in config})
    trial_id = tune.get_context().get_trial_id()
    run_stage(
        cfg, 2, data, stage1_artifact, run_name=f"{cfg.run.name}-trial-{trial_id}",
        artifact=trial_artifact_uri(artifact_root, trial_id),
        callbacks=[TuneReportCallback(), ReportPlacementGroup(reaper, trial_id)],
    )


@contextmanager
def trials_in_working_dir() -> Iterator[None]:
    """Trials start where other Ray workers do (relative config paths keep their meaning), not in Tune's trial dir.

    Tune hands this switch to the trial processes it starts during `fit`.
    """
    old = os.environ.get(RAY_CHDIR_TO_TRIAL_DIR)
    os.environ[RAY_CHDIR_TO_TRIAL_DIR] = "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(RAY_CHDIR_TO_TRIAL_DIR, None)
        else:
            os.environ[RAY_CHDIR_TO_TRIAL_DIR] = old


def search_algorithm(cfg: DuetConfig, concurrency: int) -> tuple[Any, int | None]:
    """The seeded searcher for `tune.search` and the `max_concurrent_trials` Tune should get with it."""
    seed = cfg.tune.seed if cfg.tune.seed is not None else cfg.run.seed
    if cfg.tune.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch  # imports optuna: only when asked for

        return OptunaSearch(seed=seed), concurrency
    # The random generator limits concurrency itself (Tune ignores max_concurrent_trials for it).
    return BasicVariantGenerator(max_concurrent=concurrency, random_state=seed), None


def sweep(
    cfg: DuetConfig,
    data: StageData,
    stage1_artifact: str,
    tracker: Tracker | None,
    parent_run_id: str | None,
    output: str | None = None,
    stage1_run_id: str | None = None,
) -> SweepResult:
    """Search `tune.space` with ASHA over stage-2 runs; write the best completed trial's config as YAML."""
    check_sweepable(cfg, data)
    steps = total_steps(cfg.stage2, data.num_train_samples)
    one_trial = trial_need(cfg, use_gpu_for_training(cfg), has_validation=bool(data.val_uri))
    check_fits([one_trial])
    need = one_trial.resources
    cluster = ray.cluster_resources()
    concurrency = concurrent_trials(need, cluster, cfg.tune.max_concurrent)
    experiment = f"{cfg.run.name}-sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    artifact_root = sweep_artifact_root(cfg, experiment)
    fs, fs_root = storage.resolve(storage_root(cfg), cfg.storage)
    shown_need = ", ".join(f"{v:g} {k}" for k, v in need.items())
    short = {k: cluster.get(k, 0.0) for k, v in need.items() if cluster.get(k, 0.0) < v}
    if short:
        say(f"note: the cluster has {short} now, less than one trial needs: trials wait for nodes to join")
    say(f"sweep {experiment}: {cfg.tune.num_samples} trials of {steps} steps, {cfg.tune.search} search, ASHA on "
        f"{cfg.tune.metric} ({cfg.tune.mode}); each trial holds {shown_need}: {concurrency} at a time")
    search_alg, max_concurrent = search_algorithm(cfg, concurrency)
    scheduler = ASHAScheduler(
        time_attr="step", max_t=steps, grace_period=cfg.tune.grace_period,
        reduction_factor=cfg.tune.reduction_factor,
        stop_last_trials=False,  # a trial that survives every rung finishes and writes its artifact
    )
    ledger = TrialLedger(cfg, data, artifact_root, steps, experiment, stage1_artifact, tracker, parent_run_id,
                         stage1_run_id)
    reaper = PlacementGroupReaper.options(scheduling_strategy=on_this_node()).remote()
    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial, base=cfg.model_dump(mode="json"), data=data, stage1_artifact=stage1_artifact,
            artifact_root=artifact_root, reaper=reaper,
        ),
        {"CPU": cfg.tune.trial_driver_cpus},
    )
    tuner = tune.Tuner(
        trainable,
        param_space=search_space(cfg.tune.space),
        tune_config=tune.TuneConfig(
            metric=cfg.tune.metric, mode=cfg.tune.mode, num_samples=cfg.tune.num_samples,
            scheduler=scheduler, search_alg=search_alg, max_concurrent_trials=max_concurrent,
        ),
        run_config=tune.RunConfig(name=experiment, storage_path=fs_root, storage_filesystem=fs, callbacks=[ledger]),
    )
    try:
        with trials_in_working_dir():
            grid = tuner.fit()
    finally:
        ledger.close()
        release(reaper)
    rows = [ledger.rows[k] for k in sorted(ledger.rows)]
    best = _pick_best(rows, cfg.tune.metric, cfg.tune.mode)
    best_cfg = apply_best(cfg, best.params)
    path = output or best_config_path(cfg)
    storage.write_text(path, dump_config(best_cfg), cfg.storage)
    result = SweepResult(
        best_config_path=path, best_trial_id=best.trial_id, best_params=dict(best.params),
        best_metrics=_best_metrics(grid, best.trial_id), best_artifact_uri=best.artifact_uri,
        trials=rows, experiment_path=grid.experiment_path, total_steps=steps,
    )
    if tracker is not None and parent_run_id is not None:
        _log_summary(tracker, parent_run_id, cfg, result, dump_config(best_cfg))
    return result


def _pick_best(rows: list[TrialRow], metric: str, mode: str) -> TrialRow:
    """The best trial that ran to its last step (only those have an artifact and a final metric)."""
    done = [r for r in rows if r.status == "TERMINATED" and not r.early_stopped and r.metric is not None]
    if not done:
        failures = "; ".join(f"{r.trial_id}: {r.status}{' ' + r.error if r.error else ''}" for r in rows)
        raise SweepError(f"no trial ran to completion with a {metric!r} value ({failures or 'no trials ran'})")
    pick = min if mode == "min" else max
    return pick(done, key=lambda r: r.metric)  # type: ignore[arg-type, return-value]


def _best_metrics(grid: Any, trial_id: str) -> dict[str, float]:
    for result in grid:
        if (result.metrics or {}).get("trial_id") == trial_id:
            return training_metrics(result.metrics)
    return {}


def _log_summary(tracker: Tracker, run_id: str, cfg: DuetConfig, result: SweepResult, best_yaml: str) -> None:
    """The sweep's outcome on the parent run: trials table, best config, best trial's ids and metric."""
    tracker.log_text(run_id, format_trials(result.trials, cfg.tune.metric, result.total_steps), "sweep/trials.txt")
    tracker.log_text(run_id, best_yaml, "sweep/best_config.yaml")
    best = next(r for r in result.trials if r.trial_id == result.best_trial_id)
    tags = {TAG_SWEEP_BEST_TRIAL: best.trial_id, TAG_SWEEP_EXPERIMENT_PATH: result.experiment_path}
    if best.run_id:
        tags[TAG_SWEEP_BEST_RUN] = best.run_id
    tracker.set_tags(run_id, tags)
    if best.metric is not None and math.isfinite(best.metric):
        tracker.log_metrics(run_id, {f"sweep_best_{cfg.tune.metric}": best.metric})
