"""Stage 1: train VCE + projector on caption pairs (LLM and vision tower frozen).

    python pipelines/pretrain.py --config pipelines/configs/demo.yaml [--set stage1.max_steps=100]
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from components.config import parse_cli  # noqa: E402
from components.workflow import exit_status, run_single_stage  # noqa: E402


def main(argv: Sequence[str] | None = None) -> None:
    cfg, _ = parse_cli(__doc__.splitlines()[0], argv)
    result = run_single_stage(cfg, stage=1)
    print(f"stage 1 artifact: {result.artifact_uri}")


if __name__ == "__main__":
    sys.exit(exit_status(main))
