"""Write a dataset's WebDataset shards and manifests (synthetic, LLaVA JSON or UniFood JSON).

The flags override the matching data.* keys (--output is data.root; relative paths given as
flags are relative to the current directory). Splits whose manifest already exists for the
same inputs are reported as re-used, not rewritten.

examples:
  python pipelines/prepare_data.py --config pipelines/configs/demo.yaml
  python pipelines/prepare_data.py --source llava --input data/llava.json --output s3://bucket/datasets \\
      --set data.name=llava-mix --set storage.endpoint_url=http://127.0.0.1:9000
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from components.config import ConfigError, DataSection, DuetConfig, parse_cli
from components.console import run_script
from components.data.prepare import SplitResult, prepare

FLAG_TO_FIELD = {"source": "source", "input": "input", "output": "root", "num_records": "num_records", "seed": "seed"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", choices=["synthetic", "llava", "unifood"], help="overrides data.source")
    parser.add_argument("--input", help="LLaVA/UniFood JSON file (not for synthetic); overrides data.input")
    parser.add_argument("--output", help="dataset root URI (local path or s3://); overrides data.root")
    parser.add_argument("--num-records", type=int, help="synthetic: instruction records; overrides data.num_records")
    parser.add_argument("--seed", type=int, help="overrides data.seed")


def apply_flags(cfg: DuetConfig, args: argparse.Namespace) -> DuetConfig:
    """The config with the CLI flags written into data.*, validated again."""
    updates = {field: getattr(args, flag) for flag, field in FLAG_TO_FIELD.items() if getattr(args, flag) is not None}
    for field in ("input", "root"):  # a path typed on the command line is relative to where it was typed
        if field in updates and "://" not in updates[field]:
            updates[field] = os.path.abspath(updates[field])
    if updates.get("source") == "synthetic" and args.input is not None:
        raise ConfigError("--input is not used with --source synthetic (the generator needs no input file)")
    try:
        data = DataSection.model_validate({**cfg.data.model_dump(), **updates})
    except ValidationError as err:
        lines = [f"  data.{'.'.join(map(str, e['loc'])) or '(section)'}: {e['msg'].removeprefix('Value error, ')}"
                 for e in err.errors()]
        raise ConfigError("invalid data settings:\n" + "\n".join(lines)) from None
    return cfg.model_copy(update={"data": data})


def format_results(results: list[SplitResult]) -> str:
    rows = [("split", "records", "shards", "tasks", "status", "digest (dataset version)")]
    for r in results:
        tasks = ", ".join(f"{k}={v}" for k, v in r.manifest.task_mix.items())
        rows.append((r.split, str(r.manifest.count), str(len(r.manifest.shards)), tasks,
                     "reused" if r.reused else "written", r.manifest.digest))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def main(argv: Sequence[str] | None = None) -> int:
    cfg, args = parse_cli(__doc__, argv, add_arguments)
    cfg = apply_flags(cfg, args)
    data = cfg.data
    print(f"preparing dataset {data.name!r} from {data.source}"
          f"{'' if data.source == 'synthetic' else f' ({data.input})'} under {data.root}")
    results = prepare(data, cfg.storage, progress=lambda msg: print(f"  {msg}", flush=True))
    print(format_results(results))
    for r in results:
        print(f"{r.split}: {r.uri}")
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
