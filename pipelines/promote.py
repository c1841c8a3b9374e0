"""Move the registry alias (default "champion") to a model version if it beats the current one.

    python pipelines/promote.py --model duet-llava --version 7 [--force] [--config FILE] [--set key=value]

The gate compares registry.metric (direction registry.direction, margin
registry.min_margin) recorded on the versions; --force skips it and is recorded
on the version. Exit status: 0 promoted or already holding the alias, 1 refused
by the gate (the reason is printed), 2 bad arguments or an error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from components.config import parse_cli  # noqa: E402
from components.registry import Registry, RegistryError  # noqa: E402
from components.tracking import Tracker, TrackingError  # noqa: E402


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="registered model name (default: registry.model_name)")
    parser.add_argument("--version", required=True, help="model version to promote")
    parser.add_argument("--force", action="store_true", help="promote without the metric gate (recorded)")


def main(argv: Sequence[str] | None = None) -> int:
    cfg, args = parse_cli(__doc__.splitlines()[0], argv, extra=_arguments)
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
    except (TrackingError, RegistryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(decision)
    return 1 if decision.outcome == "rejected" else 0


if __name__ == "__main__":
    sys.exit(main())
