"""What pipelines/sweep.py runs: start-up, stage 1 (or its reuse), the Tune sweep, the trials table."""

from __future__ import annotations

from components.config import DuetConfig
from components.console import say
from components.layout import (
    best_config_path,
)
from components.locks import run_lock
from components.tune.space import check_sweepable
from components.tune.sweep import SweepResult, format_trials, sweep
from components.workflow.startup import stage_data, start
from components.workflow.tracked_stage import tracked_stage


def run_sweep(cfg: DuetConfig, output: str | None = None) -> SweepResult:
    """What pipelines/sweep.py runs: start-up, stage 1 (or its reuse), the Tune sweep, the trials table."""
    cfg = cfg.with_absolute_paths()  # trials and their workers run in other directories
    check_sweepable(cfg)  # every corner of the space must validate before any work
    output = output or best_config_path(cfg)
    say(f"sweep: {cfg.tune.num_samples} trials over tune.space, best config to {output}")
    with run_lock(cfg):  # after the checks above: a refused config writes nothing
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
