"""Evaluate a stage artifact on a prepared split by batch generation on Ray Data (paper section 4.2 metrics).

--model defaults to this run's stage-2 artifact; --baseline also evaluates the zero-shot model
(this run's stage-1 artifact, or --baseline-model; `base` means the bare base checkpoint) and prints
both side by side; with eval.blind_baseline the fine-tuned model is evaluated once more with every
image blanked, and the "from vision" column shows what the pictures contribute. --output writes the per-sample table (.csv, .json or .jsonl) with a `model` column.
Every input is checked before Ray starts.

examples:
  python pipelines/evaluate.py --config pipelines/configs/demo.yaml --baseline
  python pipelines/evaluate.py --config pipelines/configs/demo.yaml --model .duet/runs/demo/stage2/artifact \\
      --split validation --output samples.csv
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from components.config import ConfigError, DuetConfig, parse_cli
from components.console import run_script, say

BASE_MODEL = "base"


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="stage artifact URI to evaluate (default: this run's stage-2 artifact)")
    parser.add_argument("--baseline", action="store_true",
                        help="also evaluate the zero-shot model (before stage 2) and compare")
    parser.add_argument("--baseline-model", metavar="URI|base",
                        help="the baseline: a stage artifact URI, or 'base' for the bare base checkpoint "
                             "(default: this run's stage-1 artifact); implies --baseline")
    parser.add_argument("--split", choices=("test", "validation"), default="test", help="split to evaluate")
    parser.add_argument("--output", help="write the per-sample table here (.csv, .json or .jsonl)")


def models_to_evaluate(cfg: DuetConfig, args: argparse.Namespace) -> dict[str, str | None]:
    """Display name -> model source (None: the bare base checkpoint), baseline first."""
    from components.layout import artifact_uri

    models: dict[str, str | None] = {}
    if args.baseline or args.baseline_model:
        chosen = args.baseline_model or artifact_uri(cfg, 1)
        models["zero-shot"] = None if chosen == BASE_MODEL else chosen
    models["fine-tuned"] = args.model or artifact_uri(cfg, 2)
    return models


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    cfg, args = parse_cli(__doc__, argv, extra=_arguments)
    if not cfg.model.checkpoint:
        raise ConfigError("model.checkpoint is not set: evaluation needs the base checkpoint (its processor)")
    # torch, Ray, MLflow: imported once the arguments are known good
    import pandas as pd

    from components.cluster import init_ray
    from components.data.shards import read_manifest
    from components.evaluate.report import DIFFERENCES, check_table_path, comparison_table, write_table
    from components.evaluate.run import check_model_source, evaluate
    from components.layout import split_uri
    from components.quiet import quiet_driver

    quiet_driver()
    if args.output:
        check_table_path(args.output)
    split = split_uri(cfg.data, args.split)
    read_manifest(split, cfg.storage)
    models = models_to_evaluate(cfg, args)
    for source in models.values():
        check_model_source(cfg, source)
    say(init_ray(cfg))
    results = {}
    runs = [(name, source, False) for name, source in models.items()]
    if cfg.eval.blind_baseline:
        runs.append(("blind", models["fine-tuned"], True))
    for name, source, blind in runs:
        what = " with every image blanked" if blind else ""
        say(f"evaluate {name}: {source or 'base checkpoint ' + cfg.model.checkpoint}{what} on {split}")
        results[name] = evaluate(cfg, source, split, cfg.model.checkpoint, blind=blind)
    print(comparison_table(results, DIFFERENCES))
    if args.output:
        table = pd.concat([r.per_sample.assign(model=name) for name, r in results.items()], ignore_index=True)
        say(f"per-sample table: {write_table(table, args.output)}")
    return results


if __name__ == "__main__":
    sys.exit(run_script(main))
