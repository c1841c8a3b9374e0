"""The whole pipeline: data -> stage 1 -> (sweep) -> stage 2 -> evaluate -> register -> gated promotion.

    python pipelines/full.py --config pipelines/configs/demo.yaml
    ray job submit --working-dir . -- python pipelines/full.py --config pipelines/configs/llava-1.5-7b.yaml

Every step that already has its output for the same config and data is reused, so a
re-run after a failure resumes at the first incomplete step.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from components.config import parse_cli  # noqa: E402
from components.workflow import exit_status, run_full  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    cfg, _ = parse_cli(__doc__.splitlines()[0], argv)
    run_full(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(exit_status(main))
