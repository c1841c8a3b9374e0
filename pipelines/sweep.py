"""Ray Tune sweep over stage 2 (adapter rank, alpha/r, learning rates) from one stage-1 artifact.

Stage 1 runs once (or is reused when a finished run with the same inputs exists); every trial is
a stage-2 run from its artifact, stopped early by ASHA when it falls behind. The best completed
trial's config is written as YAML that `pipelines/finetune.py --config` accepts as it is.

examples:
  python pipelines/sweep.py --config pipelines/configs/demo.yaml --set tune.num_samples=8
  python pipelines/sweep.py --config pipelines/configs/demo.yaml --set tune.search=optuna --output best.yaml
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from components.config import parse_cli
from components.console import run_script


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--output", help="where the best trial's config YAML goes (default: {run.work_dir}/sweeps/{run.name}-best.yaml)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    cfg, args = parse_cli(__doc__, argv, extra=_arguments)
    from components.workflow.sweep import run_sweep

    run_sweep(cfg, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
