"""Per-step metrics that outlive a tracking outage: sent as they arrive, kept in order while the server is away."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from mlflow.entities import Metric

from components.tracking.redact import redact
from components.tracking.tracker import _MAX_METRICS_PER_BATCH, Tracker, TrackingError, _now_ms, fail_fast

_log = logging.getLogger(__name__)

class MetricsBuffer:
    """Per-step metrics of one run, sent as they arrive and kept while the tracking server is away.

    Training never waits on MLflow: a send that fails keeps its rows, in order, and the next
    send retries them first. Each attempt fails fast (no MLflow-level retries), so the caller's
    thread keeps up with training during an outage. `close` gives the server time to come back
    and returns what it still could not send; `rows` holds every row seen, sent or not.
    """

    def __init__(self, tracker: Tracker, run_id: str, retry_every_s: float = 2.0) -> None:
        self.tracker = tracker
        self.run_id = run_id
        self.retry_every_s = retry_every_s
        self.rows: list[dict[str, float]] = []
        self._pending: list[tuple[int, dict[str, float]]] = []  # (milliseconds when recorded, row)
        self._down_since: float | None = None

    @property
    def pending(self) -> int:
        return len(self._pending)

    def add(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Queue rows (each with a `step` and numbers) and try to send everything queued."""
        for row in rows:
            kept = {k: float(v) for k, v in row.items() if isinstance(v, int | float) and not isinstance(v, bool)}
            if "step" not in kept:
                raise TrackingError(f"metrics row without a 'step': {sorted(row)}")
            self.rows.append(kept)
            self._pending.append((_now_ms(), kept))
        self.flush()

    def flush(self) -> bool:
        """Send what is queued; False (rows kept) when the server does not take them."""
        while self._pending:
            chunk, count = self._next_chunk()
            try:
                with fail_fast():
                    self.tracker.client.log_batch(self.run_id, metrics=chunk)
            except Exception as exc:  # any failure: keep the row; close() reports what never got through
                if self._down_since is None:
                    self._down_since = time.monotonic()
                    _log.warning(
                        "tracking store %s did not take metrics (%s); buffering them and retrying, training goes on",
                        self.tracker.safe_uri, redact(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)[:200],
                    )
                return False
            del self._pending[:count]
        if self._down_since is not None:
            _log.warning("tracking store %s is back after %.0f s; buffered metrics sent", self.tracker.safe_uri,
                         time.monotonic() - self._down_since)
            self._down_since = None
        return True

    def _next_chunk(self) -> tuple[list[Metric], int]:
        """The oldest queued rows that fit one MLflow request (whole rows only), and how many rows that is."""
        metrics: list[Metric] = []
        count = 0
        for stamp, row in self._pending:
            values = [Metric(k, v, stamp, int(row["step"])) for k, v in row.items() if k != "step"]
            if metrics and len(metrics) + len(values) > _MAX_METRICS_PER_BATCH:
                break
            metrics.extend(values)
            count += 1
        return metrics, count

    def close(self, timeout_s: float) -> list[dict[str, float]]:
        """Send what is left, retrying for up to `timeout_s`; returns the rows that never got through."""
        deadline = time.monotonic() + timeout_s
        while not self.flush():
            if time.monotonic() + self.retry_every_s > deadline:
                break
            time.sleep(self.retry_every_s)
        return [row for _, row in self._pending]
