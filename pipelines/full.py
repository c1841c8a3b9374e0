"""The whole pipeline: data -> stage 1 -> (sweep) -> stage 2 -> evaluate -> register -> gated promotion.

Every step that already has its output for the same config and data is reused, so a
re-run after a failure resumes at the first incomplete step.

examples:
  python pipelines/full.py --config pipelines/configs/demo.yaml
  python pipelines/full.py --config pipelines/configs/demo.yaml --set run.work_dir=/data/duet --set adapter.r=32
  ray job submit --working-dir . -- python pipelines/full.py --config pipelines/configs/llava-1.5-7b.yaml
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from components.config import parse_cli
from components.console import run_script


def main(argv: Sequence[str] | None = None) -> int:
    cfg, _ = parse_cli(__doc__, argv)
    from components.workflow.full import run_full

    run_full(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
