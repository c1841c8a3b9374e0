"""A method study: each variant of `study.studies.NAME` trained and evaluated once per seed, then compared.

Variants x seeds run as Ray Tune trials (a grid, no early stopping) from shared stage-1 artifacts (one
per VCE setting and seed); every trial is evaluated on the same held-out split. The per-variant table
(mean +- std, 95 % interval, change against the reference, paired comparison by seed) is printed and
written under {run.work_dir}/studies/, with a CSV and, for studies with `figure: true`, Figure 5; all of
it is logged to the study's MLflow parent run. Re-running resumes: finished trials are reused.

examples:
  python pipelines/study.py --config pipelines/configs/demo.yaml --study rank
  python pipelines/study.py --config pipelines/configs/demo.yaml --study methods --set study.studies.methods.seeds=5
  ray job submit --working-dir . -- python pipelines/study.py --config pipelines/configs/llava-1.5-7b.yaml --study methods
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from components.config import parse_cli
from components.console import run_script


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--study", help="which study of study.studies to run (default: study.name)")


def main(argv: Sequence[str] | None = None) -> int:
    cfg, args = parse_cli(__doc__, argv, extra=_arguments)
    from components.workflow.study import run_study

    run_study(cfg, args.study)
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
