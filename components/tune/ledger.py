"""The trials table on the driver, mirrored into MLflow as one child run per trial.

MLflow hears about every trial from the driver (a Tune callback), never from the trial processes,
which may run on machines that cannot reach the tracking store. Tune's hooks only update the table
and queue MLflow calls on a thread of their own (`TrackingMirror`): a slow or lost tracking store
never stops the sweep.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

from ray import tune
from ray.tune.experiment import Trial
from ray.tune.result import AUTO_RESULT_KEYS

from components.config import DuetConfig
from components.layout import trial_artifact_uri
from components.tracking.buffer import MetricsBuffer
from components.tracking.redact import redact
from components.tracking.tags import (
    TAG_ARTIFACT,
    TAG_CONFIG_HASH,
    TAG_EARLY_STOPPED,
    TAG_SEARCH_PREFIX,
    TAG_SWEEP,
    TAG_TRIAL_ID,
)
from components.tracking.tracker import Tracker, TrackingUnreachable, fail_fast
from components.train.settings import VAL_MEASURED
from components.train.stage import STAGE_SPLITS, StageData
from components.tune.space import SEARCH_PARAMS, apply_best, as_python_number, is_number

log = logging.getLogger(__name__)

# Result keys that are not training metrics: Tune's bookkeeping and the reported checkpoint path.
_NOT_METRICS = set(AUTO_RESULT_KEYS) | {"done", "trial_id", "checkpoint_path", "experiment_tag", "should_checkpoint"}


@dataclass
class TrialRow:
    """One line of the trials table."""

    trial_id: str
    params: dict[str, Any]
    metric: float | None
    status: str
    early_stopped: bool
    steps: int
    run_id: str | None = None
    artifact_uri: str | None = None
    error: str | None = None


def training_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """The training metrics of one Tune result (numbers only, Tune's bookkeeping left out)."""
    return {
        k: float(v) for k, v in result.items()
        if k not in _NOT_METRICS and is_number(v)
    }


def _maybe_float(value: Any) -> float | None:
    return float(value) if is_number(value) else None


class TrackingMirror:
    """MLflow calls made in order on a thread of their own, so Tune's driver loop never waits on the store.

    A call that fails (the server is away) is tried again every `retry_every_s` until it goes
    through, holding back the calls after it so their order is kept; per-step metrics go through
    a `MetricsBuffer`, which keeps them while the server is away without holding anything back.
    `close` waits up to `timeout_s` for what is queued and raises `TrackingUnreachable` if the
    store never came back.
    """

    def __init__(self, tracker: Tracker, retry_every_s: float = 2.0) -> None:
        self.tracker = tracker
        self.retry_every_s = retry_every_s
        self._calls: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._failing_since: float | None = None
        self._thread = threading.Thread(target=self._run, name="duet-tune-mlflow", daemon=True)
        self._thread.start()

    def call(self, fn: Callable[[], None]) -> None:
        """Queue one call; it runs after every call queued before it."""
        self._calls.put(fn)

    def _run(self) -> None:
        while (fn := self._calls.get()) is not None:
            while True:
                try:
                    with fail_fast():
                        fn()
                    break
                except Exception as exc:  # the store is away (or refused): keep the call and try again
                    if self._failing_since is None:
                        self._failing_since = time.monotonic()
                        log.warning("tracking store %s did not answer (%s); sweep goes on, trial records are "
                                    "kept and sent when it is back", self.tracker.safe_uri,
                                    redact(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)[:200])
                    time.sleep(self.retry_every_s)
            if self._failing_since is not None:
                log.warning("tracking store %s is back after %.0f s", self.tracker.safe_uri,
                            time.monotonic() - self._failing_since)
                self._failing_since = None
            self._calls.task_done()
        self._calls.task_done()

    def close(self, timeout_s: float) -> None:
        """Wait for every queued call (up to `timeout_s`), then stop the thread."""
        self._calls.put(None)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise TrackingUnreachable(
                f"MLflow tracking store {self.tracker.safe_uri} stopped answering during the sweep and was still "
                f"away after tracking.outage_timeout_s={timeout_s:g}s: the trials finished (their results are in "
                "Tune's experiment folder) but their MLflow runs are incomplete"
            )


@dataclass
class _TrialRecord:
    """A trial's MLflow side, touched only on the mirror's thread."""

    run: ExitStack = field(default_factory=ExitStack)
    run_id: str | None = None
    buffer: MetricsBuffer | None = None
    history: list[dict[str, float]] = field(default_factory=list)


class TrialLedger(tune.Callback):
    """Keeps the trials table on the driver and, with a tracker, mirrors each trial as an MLflow child run.

    Tune's hooks only update the table and queue MLflow calls (`TrackingMirror`): a slow or lost
    tracking store never stops the sweep. A trial is early-stopped when it ended without error before
    its last step (ASHA's decision).
    """

    def __init__(
        self, cfg: DuetConfig, data: StageData, artifact_root: str, steps: int, experiment: str,
        stage1_artifact: str, tracker: Tracker | None = None, parent_run_id: str | None = None,
        stage1_run_id: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.data = data
        self.artifact_root = artifact_root
        self.steps = steps
        self.experiment = experiment
        self.stage1_artifact = stage1_artifact
        self.tracker = tracker if parent_run_id is not None else None
        self.parent_run_id = parent_run_id
        self.stage1_run_id = stage1_run_id
        self.rows: dict[str, TrialRow] = {}
        self._records: dict[str, _TrialRecord] = {}
        self._mirror: TrackingMirror | None = None  # started with the first trial: Tune pickles its callbacks

    def _mirror_call(self, fn: Callable[[], None]) -> None:
        if self.tracker is None:
            return
        if self._mirror is None:
            self._mirror = TrackingMirror(self.tracker)
        self._mirror.call(fn)

    # Tune's hooks --------------------------------------------------------------

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        params = {k: as_python_number(trial.config.get(k)) for k in SEARCH_PARAMS}
        row = self.rows.setdefault(trial.trial_id, TrialRow(trial.trial_id, params, None, "RUNNING", False, 0))
        row.status = "RUNNING"
        if self.tracker is None or trial.trial_id in self._records:
            return
        record = self._records[trial.trial_id] = _TrialRecord()
        self._mirror_call(lambda: self._open(row, record))

    def on_trial_result(
        self, iteration: int, trials: list[Trial], trial: Trial, result: dict[str, Any], **info: Any
    ) -> None:
        row = self.rows.get(trial.trial_id)
        if row is None or "step" not in result:
            return
        row.steps = int(result["step"])
        row.metric = _maybe_float(result.get(self.cfg.tune.metric))
        record = self._records.get(trial.trial_id)
        if record is not None:
            values = training_metrics(result)
            if not values.pop(VAL_MEASURED, 0.0):
                values.pop("val_loss", None)  # carried forward between validations: log only measured values
            self._mirror_call(lambda: self._log(record, values))

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        row = self.rows.get(trial.trial_id)
        if row is None:
            return  # never started (e.g. the sweep ended while it was pending)
        row.status = "TERMINATED"
        row.early_stopped = row.steps < self.steps
        if not row.early_stopped:
            row.artifact_uri = trial_artifact_uri(self.artifact_root, trial.trial_id)
        self._end(row, None)

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        row = self.rows.get(trial.trial_id)
        if row is None:
            return
        row.status = "ERROR"
        error = trial.get_error() or "unknown error (see the trial's error file)"
        row.error = str(error).strip().splitlines()[-1][:500] if str(error).strip() else str(error)
        self._end(row, RuntimeError(f"trial {trial.trial_id} failed: {row.error}"), full_error=str(error))

    # ---------------------------------------------------------------------------

    def close(self) -> None:
        """End the runs of trials the sweep left unfinished (interrupted) as KILLED; wait for MLflow to have it all."""
        for trial_id in list(self._records):
            row = self.rows[trial_id]
            row.status = "INTERRUPTED"
            self._end(row, KeyboardInterrupt())
        if self._mirror is not None:
            self._mirror.close(self.cfg.tracking.outage_timeout_s)

    def _end(self, row: TrialRow, error: BaseException | None, full_error: str | None = None) -> None:
        record = self._records.pop(row.trial_id, None)
        if record is not None:
            self._mirror_call(lambda: self._finish(row, record, error, full_error))

    # On the mirror's thread ----------------------------------------------------

    def _open(self, row: TrialRow, record: _TrialRecord) -> None:
        assert self.tracker is not None and self.parent_run_id is not None
        if record.run_id is None:  # a retried call must not open a second run
            tags = {TAG_TRIAL_ID: row.trial_id, TAG_SWEEP: self.experiment,
                    **{f"{TAG_SEARCH_PREFIX}{k}": v for k, v in row.params.items()}}
            record.run_id = record.run.enter_context(
                self.tracker.child_run("trial", f"trial-{row.trial_id}", self.parent_run_id, tags=tags)
            )
            row.run_id = record.run_id
            record.buffer = MetricsBuffer(self.tracker, record.run_id)
        trial_cfg = apply_best(self.cfg, row.params)
        self.tracker.log_config(record.run_id, trial_cfg)
        self.tracker.log_dataset(record.run_id, f"{self.cfg.data.name}/{STAGE_SPLITS[2]}", self.data.train_uri,
                                 self.data.digest)
        self.tracker.tag_lineage(record.run_id, self.stage1_run_id or None, self.stage1_artifact, self.data.digest)

    def _log(self, record: _TrialRecord, values: dict[str, float]) -> None:
        if record.buffer is not None:
            record.history.append(values)
            record.buffer.add([values])  # never raises for an outage: the buffer keeps the row

    def _finish(self, row: TrialRow, record: _TrialRecord, error: BaseException | None,
                full_error: str | None) -> None:
        if record.run_id is None:
            return
        if record.buffer is not None and not record.buffer.flush():
            raise TrackingUnreachable("metrics not sent yet")  # the mirror tries again
        tags = {TAG_EARLY_STOPPED: str(row.early_stopped).lower()}
        if row.artifact_uri:
            tags[TAG_ARTIFACT] = row.artifact_uri
            tags[TAG_CONFIG_HASH] = apply_best(self.cfg, row.params).hash()
        self.tracker.set_tags(record.run_id, tags)
        if full_error:
            self.tracker.log_text(record.run_id, full_error, "error.txt")
        self.tracker.log_curves(record.run_id, record.history)
        if error is None:
            record.run.close()
        else:
            record.run.__exit__(type(error), error, error.__traceback__)
