"""Print parameter counts, stage-2 trainability and fp16 size per component of the configured model.

Builds the architecture on the `meta` device: no weights are read or downloaded, so
a 7B preset of any family (model.arch) sizes the real model in seconds.

examples:
  python pipelines/inspect_model.py --config pipelines/configs/llava-1.5-7b.yaml
  python pipelines/inspect_model.py --config pipelines/configs/llava-1.5-7b.yaml --set adapter.type=lora --json
  python pipelines/inspect_model.py --config pipelines/configs/qwen2.5-vl-7b.yaml
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
    from components.model.families import family_of
    from components.model.sizes import build_meta_model, component_sizes

    model = build_meta_model(cfg, stage=2)
    sizes = component_sizes(model)
    if args.json:
        print(json.dumps(sizes, indent=2))
    else:
        family = family_of(model)
        vce = (f"VCE in front of {family.vce_site}: anchor layer {cfg.vce.anchor_layer}, references "
               f"{cfg.vce.reference_layers} of {family.vision_layers(model.config)} vision layers, "
               f"{family.vision_dim(model.config)} wide" if cfg.vce.enabled else "VCE off")
        print(f"{family.label} ({family.name}, model.arch {cfg.model.arch}); {vce}")
        print(f"{'component':<16}{'params':>16}{'trainable (stage 2)':>22}{'fp16 MiB':>12}")
        for name, row in sizes.items():
            print(f"{name:<16}{row['params']:>16,}{str(row['trainable']):>22}{row['mib_fp16']:>12.2f}")
    return sizes


if __name__ == "__main__":
    sys.exit(run_script(main))
