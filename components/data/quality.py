"""Counting skipped rows while streaming, and stopping when a split is too dirty.

How the threshold works when nothing is materialised: the manifest says how
many records the split holds (N), so the budget of bad rows is known up front:
``floor(data.max_bad_fraction * N)``. Every preprocessing batch reports its
skipped rows (shard, key, reason) to one Ray actor per split; the moment the
distinct bad rows exceed the budget, the final fraction can only be above the
threshold, so the batch that crossed it raises ``DataQualityError`` naming the
worst shard and the counts by reason. That error surfaces where the data is
consumed (``iter_torch_batches`` in the trainer), failing the stage early
instead of after a whole epoch. Rows are identified by (shard, key), so a second
epoch over the same bad rows does not count them twice.

The counts reach the driver or the trainer through ``quality_report``.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import ray

from components.errors import DuetError


class DataQualityError(DuetError, RuntimeError):
    """Too many bad rows in a split; the message names the worst shard and the counts by reason."""


@dataclass(frozen=True)
class QualityReport:
    split: str
    total: int
    max_bad_fraction: float
    rows_seen: int
    bad: dict[str, int] = field(default_factory=dict)
    by_shard: dict[str, dict[str, int]] = field(default_factory=dict)
    failure: str | None = None

    @property
    def num_bad(self) -> int:
        return sum(self.bad.values())

    @property
    def bad_fraction(self) -> float:
        return self.num_bad / self.total if self.total else 0.0


class _Monitor:
    """State of one split's counts (kept in a Ray actor; plain class so it can be unit-tested)."""

    def __init__(self, split: str, total: int, max_bad_fraction: float) -> None:
        self.split = split
        self.total = total
        self.max_bad_fraction = max_bad_fraction
        self.budget = math.floor(max_bad_fraction * total)
        self.seen: Counter[str] = Counter()
        self.bad: dict[tuple[str, str], str] = {}
        self.failure: str | None = None

    def report(self, seen: dict[str, int], bad: list[tuple[str, str, str]]) -> str | None:
        """Add a batch's counts; returns the failure message once the budget is exceeded."""
        self.seen.update(seen)
        for shard, key, reason in bad:
            self.bad.setdefault((shard, key), reason)
        if self.failure is None and len(self.bad) > self.budget:
            self.failure = self._message()
        return self.failure

    def _by_shard(self) -> dict[str, dict[str, int]]:
        out: dict[str, Counter[str]] = defaultdict(Counter)
        for (shard, _key), reason in self.bad.items():
            out[shard][reason] += 1
        return {shard: dict(sorted(c.items())) for shard, c in sorted(out.items())}

    def _message(self) -> str:
        by_shard = self._by_shard()
        worst = max(by_shard, key=lambda s: (sum(by_shard[s].values()), s))
        reasons = Counter(self.bad.values())
        return (
            f"split {self.split!r}: {len(self.bad)} bad rows so far out of {self.total} records exceeds "
            f"data.max_bad_fraction={self.max_bad_fraction} (at most {self.budget} allowed). "
            f"Worst shard: {worst} with {sum(by_shard[worst].values())} bad ({by_shard[worst]}). "
            f"Bad rows by reason: {dict(sorted(reasons.items()))}. "
            "Fix or re-create the shards (pipelines/prepare_data.py), or raise data.max_bad_fraction."
        )

    def snapshot(self) -> QualityReport:
        return QualityReport(
            split=self.split, total=self.total, max_bad_fraction=self.max_bad_fraction,
            rows_seen=sum(self.seen.values()), bad=dict(sorted(Counter(self.bad.values()).items())),
            by_shard=self._by_shard(), failure=self.failure,
        )


QualityMonitor = ray.remote(num_cpus=0, max_restarts=0)(_Monitor)


def monitor_name(split_digest: str, max_bad_fraction: float) -> str:
    return f"duet-data-quality-{split_digest[:16]}-{max_bad_fraction:g}"


def get_monitor(split: str, split_digest: str, total: int, max_bad_fraction: float) -> ray.actor.ActorHandle:
    """The split's monitor actor in this Ray job (created on first use, shared by every dataset over it)."""
    return QualityMonitor.options(
        name=monitor_name(split_digest, max_bad_fraction), get_if_exists=True
    ).remote(split, total, max_bad_fraction)


def report_batch(monitor: ray.actor.ActorHandle, seen: dict[str, int], bad: list[tuple[str, str, str]]) -> None:
    """Send a batch's counts; waits for the verdict only when the batch had bad rows (then raises if over)."""
    if not bad:
        monitor.report.remote(seen, bad)
        return
    failure = ray.get(monitor.report.remote(seen, bad))
    if failure:
        raise DataQualityError(failure)


def read_report(split_digest: str, max_bad_fraction: float) -> QualityReport | None:
    """The counts so far for a split, or None when nothing has streamed it in this Ray job."""
    try:
        actor = ray.get_actor(monitor_name(split_digest, max_bad_fraction))
    except ValueError:
        return None
    return ray.get(actor.snapshot.remote())
