"""Stage 2: Dual-LoRA (or a baseline adapter) + VCE + projector on instruction data.

Starts from a stage-1 artifact: this run name's own (pipelines/pretrain.py) or any other
given by URI, checked against the config before anything runs; the stage-2 run is tagged
with the artifact, the run that wrote it and its data digest.

examples:
  python pipelines/finetune.py --config pipelines/configs/demo.yaml
  python pipelines/finetune.py --config pipelines/configs/demo.yaml --stage1-artifact s3://runs/demo/stage1/artifact
  python pipelines/finetune.py --config best.yaml   # the config a sweep wrote
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from components.config import parse_cli
from components.console import run_script


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--stage1-artifact", metavar="URI", help="stage-1 artifact to start from (default: this run name's)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    cfg, args = parse_cli(__doc__, argv, extra=_arguments)
    from components.workflow.tracked_stage import run_single_stage

    result = run_single_stage(cfg, stage=2, stage1_artifact=args.stage1_artifact)
    print(f"stage 2 artifact: {result.artifact_uri}")
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
