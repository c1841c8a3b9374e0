"""Print parameter counts, stage-2 trainability and fp16 size per component of the configured model.

Builds the architecture on the `meta` device: no weights are read or downloaded, so
the LLaVA-1.5-7B config sizes the real model in seconds.

examples:
  python pipelines/inspect_model.py --config pipelines/configs/llava-1.5-7b.yaml
  python pipelines/inspect_model.py --config pipelines/configs/llava-1.5-7b.yaml --set adapter.type=lora --json
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from components.config import parse_cli
from components.console import run_script


def main(argv: Sequence[str] | None = None) -> dict:
    cfg, args = parse_cli(
        __doc__, argv, extra=lambda p: p.add_argument("--json", action="store_true", help="print one JSON object"),
    )
    from components.model.sizes import build_meta_model, component_sizes

    sizes = component_sizes(build_meta_model(cfg, stage=2))
    if args.json:
        print(json.dumps(sizes, indent=2))
    else:
        print(f"{'component':<16}{'params':>16}{'trainable (stage 2)':>22}{'fp16 MiB':>12}")
        for name, row in sizes.items():
            print(f"{name:<16}{row['params']:>16,}{str(row['trainable']):>22}{row['mib_fp16']:>12.2f}")
    return sizes


if __name__ == "__main__":
    sys.exit(run_script(main))
