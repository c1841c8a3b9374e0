"""Print parameter counts, stage-2 trainability and fp16 size per component of the configured model.

Builds the architecture on the `meta` device: no weights are read or downloaded, so
`--config pipelines/configs/llava-1.5-7b.yaml` sizes the real LLaVA-1.5-7B in seconds.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from components.config import parse_cli  # noqa: E402
from components.model.mllm import build_meta_model, component_sizes  # noqa: E402


def main(argv: Sequence[str] | None = None) -> dict:
    cfg, args = parse_cli(
        __doc__.splitlines()[0], argv,
        extra=lambda p: p.add_argument("--json", action="store_true", help="print one JSON object"),
    )
    sizes = component_sizes(build_meta_model(cfg, stage=2))
    if args.json:
        print(json.dumps(sizes, indent=2))
    else:
        print(f"{'component':<16}{'params':>16}{'trainable (stage 2)':>22}{'fp16 MiB':>12}")
        for name, row in sizes.items():
            print(f"{name:<16}{row['params']:>16,}{str(row['trainable']):>22}{row['mib_fp16']:>12.2f}")
    return sizes


if __name__ == "__main__":
    main()
