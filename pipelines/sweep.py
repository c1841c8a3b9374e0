"""Ray Tune sweep over stage 2 (adapter rank, alpha/r, learning rates) from one stage-1 artifact.

    python pipelines/sweep.py --config pipelines/configs/demo.yaml --set tune.num_samples=8 [--output best.yaml]

Stage 1 runs once (or is reused when a finished run with the same inputs exists); every trial is
a stage-2 run from its artifact. The best completed trial's config is written as YAML that
`pipelines/finetune.py --config` accepts as it is.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from components.config import ConfigError, parse_cli  # noqa: E402
from components.tracking import Tracker  # noqa: E402
from components.tune import SweepResult, check_sweepable, default_output, format_trials, sweep  # noqa: E402
from components.workflow import (  # noqa: E402
    ensure_base_model,
    ensure_dataset,
    init_ray,
    say,
    stage_data,
    tracked_stage,
)


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--output", help="where the best trial's config YAML goes (default: {run.work_dir}/sweeps/{run.name}-best.yaml)"
    )


def main(argv: Sequence[str] | None = None) -> SweepResult:
    cfg, args = parse_cli(__doc__.splitlines()[0], argv, extra=_arguments)
    try:
        check_sweepable(cfg)
    except ConfigError as exc:  # refused like any invalid config: before any cluster work, exit status 2
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    cfg = cfg.with_absolute_paths()  # trials and their workers run in other directories
    output = args.output or default_output(cfg)
    say(f"sweep: {cfg.tune.num_samples} trials over tune.space, best config to {output}")
    tracker = Tracker(cfg.tracking, cfg.run.work_dir)
    tracker.check_reachable()  # before any training: a tracking outage must not cost a stage
    init_ray(cfg)
    splits = ensure_dataset(cfg)
    base_dir = ensure_base_model(cfg, splits)
    with tracker.parent_run(f"{cfg.run.name}-sweep") as parent:
        tracker.log_config(parent, cfg)
        stage1 = tracked_stage(cfg, tracker, parent, 1, stage_data(cfg, 1, base_dir))
        result = sweep(
            cfg, stage_data(cfg, 2, base_dir), stage1.artifact_uri, tracker, parent, output=output,
            stage1_run_id=stage1.run_id,
        )
    print(format_trials(result.trials, cfg.tune.metric, result.total_steps))
    print(f"best trial {result.best_trial_id}: {cfg.tune.metric} {result.best_metrics.get(cfg.tune.metric)}")
    print(f"best config: {result.best_config_path}")
    if result.best_artifact_uri:
        print(f"best stage-2 artifact: {result.best_artifact_uri}")
    print(f"Tune experiment: {result.experiment_path}")
    return result


if __name__ == "__main__":
    main()
