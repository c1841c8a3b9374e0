"""Move the registry alias (default "champion") to a model version if it beats the current one.

The gate compares registry.metric (direction registry.direction, margin
registry.min_margin) recorded on the versions; --force skips it and is recorded
on the version. Exit status: 0 promoted or already holding the alias, 1 refused
by the gate (the reason is printed), 2 bad arguments or an error.

examples:
  python pipelines/promote.py --model duet-llava --version 7
  python pipelines/promote.py --config pipelines/configs/demo.yaml --version 3 --force
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from components.config import parse_cli
from components.console import error, run_script
from components.errors import DuetError


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="registered model name (default: registry.model_name)")
    parser.add_argument("--version", required=True, help="model version to promote")
    parser.add_argument("--force", action="store_true", help="promote without the metric gate (recorded)")


def main(argv: Sequence[str] | None = None) -> int:
    cfg, args = parse_cli(__doc__, argv, extra=_arguments)
    from components.registry import Registry  # MLflow: imported once the arguments are known good
    from components.tracking.tracker import Tracker

    name = args.model or cfg.registry.model_name
    reg = cfg.registry
    tracker = Tracker(cfg.tracking, cfg.run.work_dir)
    print(
        f"promote {name} version {args.version} to @{reg.alias} at {tracker.safe_uri}: "
        + ("forced" if args.force else f"gate {reg.metric} {reg.direction} by more than {reg.min_margin:g}"),
        flush=True,
    )
    try:
        tracker.check_reachable()
        decision = Registry(tracker, reg).promote(args.version, force=args.force, name=name)
    except DuetError as exc:  # status 2 for any error: 1 means "refused by the gate"
        error(str(exc))
        return 2
    print(decision)
    return 1 if decision.outcome == "rejected" else 0


if __name__ == "__main__":
    sys.exit(run_script(main))
