"""Stage 2: Dual-LoRA (or a baseline adapter) + VCE + projector on instruction data.

    python pipelines/finetune.py --config pipelines/configs/demo.yaml --stage1-artifact URI
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from components.config import parse_cli  # noqa: E402
from components.workflow import exit_status, run_single_stage  # noqa: E402


def _arguments(parser) -> None:
    parser.add_argument(
        "--stage1-artifact", help="stage-1 artifact URI (default: this run name's stage-1 artifact)"
    )


def main(argv: Sequence[str] | None = None) -> None:
    cfg, args = parse_cli(__doc__.splitlines()[0], argv, extra=_arguments)
    result = run_single_stage(cfg, stage=2, stage1_artifact=args.stage1_artifact)
    print(f"stage 2 artifact: {result.artifact_uri}")


if __name__ == "__main__":
    sys.exit(exit_status(main))
