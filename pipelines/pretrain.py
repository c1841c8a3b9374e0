"""Stage 1: train VCE + projector on caption pairs (LLM and vision tower frozen).

Writes the dataset and (for the tiny demo model) the base first when they are missing;
a re-run with the same run.name resumes from the last checkpoint.

examples:
  python pipelines/pretrain.py --config pipelines/configs/demo.yaml
  python pipelines/pretrain.py --config pipelines/configs/demo.yaml --set stage1.max_steps=100
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from components.config import parse_cli
from components.console import run_script


def main(argv: Sequence[str] | None = None) -> int:
    cfg, _ = parse_cli(__doc__, argv)
    from components.workflow.tracked_stage import run_single_stage

    result = run_single_stage(cfg, stage=1)
    print(f"stage 1 artifact: {result.artifact_uri}")
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
