"""Ray Tune search over the stage-2 driver: adapter rank, alpha/r and the two stage-2 learning rates.

Each trial is one stage-2 run (`run_stage`, a TorchTrainer with its own workers) inside a Tune
function trainable. Rank 0's per-step reports reach Tune through `TuneReportCallback`; ASHA
compares trials at its rungs on `tune.metric` and stops the weak ones. MLflow hears about every
trial from the driver (a Tune callback), never from the trial processes, which may run on machines
that cannot reach the tracking store. The best completed trial's config is written as YAML that the
stage-2 pipeline accepts as it is (`--config best.yaml`).

Search parameters are named as in `tune.space`: `r` sets `adapter.r`, `alpha_over_r` sets
`adapter.alpha = r * alpha_over_r`, `adapter_lr` and `lr` set `stage2.adapter_lr` and `stage2.lr`.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import ray
from ray import tune
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError
from ray.train.constants import RAY_CHDIR_TO_TRIAL_DIR
from ray.train.v2._internal.execution.callback import ControllerCallback, WorkerGroupCallback
from ray.tune.experiment import Trial
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.result import AUTO_RESULT_KEYS
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import BasicVariantGenerator
from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

from components import storage
from components.cluster import Need, check_fits, stage_need, use_gpu_for_training
from components.config import ConfigError, PipelineConfig, SearchSpace, config_from_dict, dump_config
from components.console import say
from components.errors import DuetError
from components.tracking import (
    TAG_ARTIFACT,
    TAG_CONFIG_HASH,
    MetricsBuffer,
    Tracker,
    TrackingUnreachable,
    fail_fast,
    redact,
)
from components.train.settings import VAL_MEASURED, total_steps
from components.train.stage import STAGE_SPLITS, StageData, run_stage, storage_root

log = logging.getLogger("duet.tune")

SEARCH_PARAMS = ("r", "alpha_over_r", "adapter_lr", "lr")
TUNABLE_ADAPTERS = ("lora", "dual_lora")  # the baselines size their experts with other keys
TAG_EARLY_STOPPED = "duet.early_stopped"
TAG_TRIAL_ID = "duet.trial_id"
TAG_SWEEP = "duet.sweep"
TAG_SEARCH_PREFIX = "duet.search."
# Result keys that are not training metrics: Tune's bookkeeping and the reported checkpoint path.
_NOT_METRICS = set(AUTO_RESULT_KEYS) | {"done", "trial_id", "checkpoint_path", "experiment_tag", "should_checkpoint"}


class SweepError(DuetError, RuntimeError):
    """A sweep that cannot produce a best config; the message says which trials failed and why."""


# ---------------------------------------------------------------- search space and configs


def search_space(space: SearchSpace) -> dict[str, Any]:
    """Tune's param_space for `tune.space`: choices for r and alpha/r, log-uniform learning rates."""

    def log_uniform(bounds: tuple[float, float]) -> Any:
        low, high = bounds
        return low if low == high else tune.loguniform(low, high)

    return {
        "r": tune.choice(list(space.r)),
        "alpha_over_r": tune.choice(list(space.alpha_over_r)),
        "adapter_lr": log_uniform(space.adapter_lr),
        "lr": log_uniform(space.lr),
    }


def _plain(value: Any) -> Any:
    """Numpy scalars (what Tune samples) as Python numbers, so configs validate and dump cleanly."""
    return value.item() if hasattr(value, "item") else value


def apply_best(cfg: PipelineConfig, best: Mapping[str, Any]) -> PipelineConfig:
    """`cfg` with a search point applied, validated as a whole.

    Without `alpha_over_r` the base config's alpha/r ratio is kept for the new rank.
    """
    unknown = sorted(set(best) - set(SEARCH_PARAMS))
    if unknown:
        raise ConfigError(
            f"unknown search parameter(s) {', '.join(unknown)}: the sweep searches {', '.join(SEARCH_PARAMS)} "
            "(tune.space.*)"
        )
    point = {k: _plain(v) for k, v in best.items()}
    tree = cfg.model_dump(mode="json")
    r = point.get("r", cfg.adapter.r)
    ratio = point.get("alpha_over_r", cfg.adapter.alpha / cfg.adapter.r)
    if not (_is_number(ratio) and ratio > 0):
        raise ConfigError(f"search point alpha_over_r={ratio!r} must be a positive number (tune.space.alpha_over_r)")
    tree["adapter"]["r"] = r
    if _is_number(r) and ("r" in point or "alpha_over_r" in point):  # a non-number r: validation names it
        tree["adapter"]["alpha"] = r * ratio
    if "adapter_lr" in point:
        tree["stage2"]["adapter_lr"] = point["adapter_lr"]
    if "lr" in point:
        tree["stage2"]["lr"] = point["lr"]
    try:
        return config_from_dict(tree)
    except ConfigError as err:
        shown = ", ".join(f"{k}={v!r}" for k, v in point.items())
        raise ConfigError(
            f"search point {shown} gives an invalid config (narrow tune.space to valid values):\n"
            f"{str(err).removeprefix('invalid config:').lstrip()}"
        ) from None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_sweepable(cfg: PipelineConfig, data: StageData | None = None) -> None:
    """Refuse a sweep that cannot work, before any cluster work: every corner of the space must validate."""
    if cfg.adapter.type not in TUNABLE_ADAPTERS:
        raise ConfigError(
            f"adapter.type {cfg.adapter.type!r} cannot be swept: tune.space.r and alpha_over_r set adapter.r and "
            f"adapter.alpha, which only {' and '.join(TUNABLE_ADAPTERS)} use; set adapter.type to one of them"
        )
    space = cfg.tune.space
    for r, ratio, adapter_lr, lr in itertools.product(
        space.r, space.alpha_over_r, sorted(set(space.adapter_lr)), sorted(set(space.lr))
    ):
        apply_best(cfg, {"r": r, "alpha_over_r": ratio, "adapter_lr": adapter_lr, "lr": lr})
    if data is None:
        return
    if cfg.tune.metric == "val_loss" and not data.val_uri:
        raise ConfigError(
            "tune.metric 'val_loss' needs a validation split, and this dataset has none: set "
            "data.val_fraction > 0 (and re-prepare the data) or set tune.metric=loss"
        )
    steps = total_steps(cfg.stage2, data.num_train_samples)
    if cfg.tune.grace_period > steps:
        raise ConfigError(
            f"tune.grace_period ({cfg.tune.grace_period}) exceeds the stage-2 steps ({steps}): no trial could be "
            "stopped early; lower tune.grace_period or raise stage2.max_steps"
        )


# ---------------------------------------------------------------- resources


def trial_need(cfg: PipelineConfig, use_gpu: bool, has_validation: bool) -> Need:
    """What one trial holds: its driver, its training workers and their data preprocessing."""
    stage = stage_need(cfg, 2, has_validation, use_gpu)
    resources = dict(stage.resources)
    resources["CPU"] = resources["CPU"] + cfg.tune.trial_driver_cpus
    return Need("one sweep trial", resources,
                f"its driver {cfg.tune.trial_driver_cpus:g} CPU (tune.trial_driver_cpus) + {stage.breakdown}")


def trial_resources(cfg: PipelineConfig, use_gpu: bool, has_validation: bool) -> dict[str, float]:
    """The resources of `trial_need`, as Tune's concurrency arithmetic takes them."""
    return trial_need(cfg, use_gpu, has_validation).resources


def concurrent_trials(need: Mapping[str, float], cluster: Mapping[str, float], cap: int | None) -> int:
    """How many trials fit side by side (at least one: an autoscaler may add nodes), capped by `cap`."""
    fits = min(
        (int(cluster.get(resource, 0.0) / amount + 1e-9) for resource, amount in need.items() if amount > 0),
        default=1,
    )
    return max(1, min(fits, cap) if cap is not None else fits)


# ---------------------------------------------------------------- results


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


@dataclass
class SweepResult:
    best_config_path: str
    best_trial_id: str
    best_params: dict[str, Any]
    best_metrics: dict[str, float]
    best_artifact_uri: str | None
    trials: list[TrialRow] = field(default_factory=list)
    experiment_path: str = ""
    total_steps: int = 0


def format_trials(rows: list[TrialRow], metric: str, total: int) -> str:
    """The trials table as fixed-width text (printed by the sweep pipeline, logged to the parent run)."""
    header = ["trial", *SEARCH_PARAMS, metric, "steps", "status", "early-stopped", "mlflow run"]
    lines = [header]
    for row in rows:
        params = [_fmt(row.params.get(p)) for p in SEARCH_PARAMS]
        lines.append([
            row.trial_id, *params, _fmt(row.metric), f"{row.steps}/{total}", row.status,
            "yes" if row.early_stopped else "no", row.run_id or "-",
        ])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """The training metrics of one Tune result (numbers only, Tune's bookkeeping left out)."""
    return {
        k: float(v) for k, v in result.items()
        if k not in _NOT_METRICS and _is_number(v)
    }


# ---------------------------------------------------------------- driver-side trial bookkeeping


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
        self, cfg: PipelineConfig, data: StageData, artifact_root: str, steps: int, experiment: str,
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
        params = {k: _plain(trial.config.get(k)) for k in SEARCH_PARAMS}
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
            values = _metrics(result)
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


def _maybe_float(value: Any) -> float | None:
    return float(value) if _is_number(value) else None


def trial_artifact_uri(artifact_root: str, trial_id: str) -> str:
    """Where a trial's stage-2 artifact goes: one folder per trial under the sweep's root."""
    return storage.join(artifact_root, trial_id, "artifact")


# ---------------------------------------------------------------- stopped trials give their workers back


@ray.remote(num_cpus=0)
class PlacementGroupReaper:
    """Removes the worker placement group of a trial's Train run once its controller is gone.

    ASHA ends a trial by ending the trial's process, which takes its Train controller and the
    workers with it; their placement group, though, lives as long as the job. Ray Train's own
    cleaner asks the state API, which a local cluster started without the dashboard does not
    serve, so stopped trials would keep their CPUs/GPUs and later trials would wait forever.
    Runs that shut down normally remove their group themselves and are forgotten here.
    """

    def __init__(self, interval_s: float = 1.0) -> None:
        self._watched: dict[str, tuple[Any, PlacementGroup]] = {}
        self._lock = threading.Lock()
        self._interval_s = interval_s
        threading.Thread(target=self._loop, name="duet-pg-reaper", daemon=True).start()

    def watch(self, key: str, controller: Any, group: PlacementGroup) -> None:
        with self._lock:
            self._watched[key] = (controller, group)

    def forget(self, key: str) -> None:
        with self._lock:
            self._watched.pop(key, None)

    def pending(self) -> int:
        with self._lock:
            return len(self._watched)

    def reap(self) -> int:
        """Remove the groups of dead controllers; returns how many were removed."""
        with self._lock:
            items = list(self._watched.items())
        removed = 0
        for key, (controller, group) in items:
            if _alive(controller):
                continue
            if placement_group_table(group).get("state", "REMOVED") != "REMOVED":
                remove_placement_group(group)
                removed += 1
            with self._lock:
                if key in self._watched and self._watched[key][1] is group:
                    del self._watched[key]
        return removed

    def _loop(self) -> None:
        while True:
            time.sleep(self._interval_s)
            try:
                self.reap()
            except Exception as exc:  # keep watching: a failed check now may pass on the next round
                log.warning("placement-group reaper: %s: %s", type(exc).__name__, exc)


def _alive(controller: Any, timeout_s: float = 10.0) -> bool:
    try:
        ray.get(controller.__ray_ready__.remote(), timeout=timeout_s)
    except (ActorUnavailableError, GetTimeoutError):
        return True  # restarting or busy: ask again next round
    except RayActorError:
        return False
    return True


class ReportPlacementGroup(ControllerCallback, WorkerGroupCallback):
    """Runs in a trial's Train controller: hands each worker group's placement group to the reaper."""

    def __init__(self, reaper: Any, key: str) -> None:
        self._reaper = reaper
        self._key = key
        self._controller: Any = None

    def after_controller_start(self, train_run_context: Any) -> None:
        self._controller = ray.get_runtime_context().current_actor

    def after_worker_group_start(self, worker_group: Any) -> None:
        group = worker_group.get_worker_group_state().placement_group_handle.placement_group
        ray.get(self._reaper.watch.remote(self._key, self._controller, group))

    async def before_controller_shutdown(self) -> None:
        await self._reaper.forget.remote(self._key)

    def before_controller_abort(self) -> None:
        self._reaper.forget.remote(self._key)


# ---------------------------------------------------------------- the trial


def run_trial(
    config: dict[str, Any], *, base: dict[str, Any], data: StageData, stage1_artifact: str, artifact_root: str,
    reaper: Any,
) -> None:
    """One Tune trial: the base config plus the sampled point, trained as a stage-2 run."""
    cfg = apply_best(config_from_dict(base), {k: config[k] for k in SEARCH_PARAMS if k in config})
    trial_id = tune.get_context().get_trial_id()
    run_stage(
        cfg, 2, data, stage1_artifact, run_name=f"{cfg.run.name}-trial-{trial_id}",
        artifact=trial_artifact_uri(artifact_root, trial_id),
        callbacks=[TuneReportCallback(), ReportPlacementGroup(reaper, trial_id)],
    )


@contextmanager
def _trials_in_working_dir() -> Iterator[None]:
    """Trials start where other Ray workers do (relative config paths keep their meaning), not in Tune's trial dir.

    Tune hands this switch to the trial processes it starts during `fit`.
    """
    old = os.environ.get(RAY_CHDIR_TO_TRIAL_DIR)
    os.environ[RAY_CHDIR_TO_TRIAL_DIR] = "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(RAY_CHDIR_TO_TRIAL_DIR, None)
        else:
            os.environ[RAY_CHDIR_TO_TRIAL_DIR] = old


def search_algorithm(cfg: PipelineConfig, concurrency: int) -> tuple[Any, int | None]:
    """The seeded searcher for `tune.search` and the `max_concurrent_trials` Tune should get with it."""
    seed = cfg.tune.seed if cfg.tune.seed is not None else cfg.run.seed
    if cfg.tune.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch  # imports optuna: only when asked for

        return OptunaSearch(seed=seed), concurrency
    # The random generator limits concurrency itself (Tune ignores max_concurrent_trials for it).
    return BasicVariantGenerator(max_concurrent=concurrency, random_state=seed), None


def default_output(cfg: PipelineConfig) -> str:
    """Where the best config goes unless told: stable per run name, so later steps can find it."""
    return os.path.join(cfg.run.work_dir, "sweeps", f"{cfg.run.name}-best.yaml")


def sweep(
    cfg: PipelineConfig,
    data: StageData,
    stage1_artifact: str,
    tracker: Tracker | None,
    parent_run_id: str | None,
    output: str | None = None,
    stage1_run_id: str | None = None,
) -> SweepResult:
    """Search `tune.space` with ASHA over stage-2 runs; write the best completed trial's config as YAML."""
    check_sweepable(cfg, data)
    steps = total_steps(cfg.stage2, data.num_train_samples)
    one_trial = trial_need(cfg, use_gpu_for_training(cfg), has_validation=bool(data.val_uri))
    check_fits([one_trial])
    need = one_trial.resources
    cluster = ray.cluster_resources()
    concurrency = concurrent_trials(need, cluster, cfg.tune.max_concurrent)
    experiment = f"{cfg.run.name}-sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    root = storage_root(cfg)
    artifact_root = storage.join(root, cfg.run.name, "sweeps", experiment)
    fs, fs_root = storage.resolve(root, cfg.storage)
    shown_need = ", ".join(f"{v:g} {k}" for k, v in need.items())
    short = {k: cluster.get(k, 0.0) for k, v in need.items() if cluster.get(k, 0.0) < v}
    if short:
        say(f"note: the cluster has {short} now, less than one trial needs: trials wait for nodes to join")
    say(f"sweep {experiment}: {cfg.tune.num_samples} trials of {steps} steps, {cfg.tune.search} search, ASHA on "
        f"{cfg.tune.metric} ({cfg.tune.mode}); each trial holds {shown_need}: {concurrency} at a time")
    search_alg, max_concurrent = search_algorithm(cfg, concurrency)
    scheduler = ASHAScheduler(
        time_attr="step", max_t=steps, grace_period=cfg.tune.grace_period,
        reduction_factor=cfg.tune.reduction_factor,
        stop_last_trials=False,  # a trial that survives every rung finishes and writes its artifact
    )
    ledger = TrialLedger(cfg, data, artifact_root, steps, experiment, stage1_artifact, tracker, parent_run_id,
                         stage1_run_id)
    reaper = PlacementGroupReaper.remote()
    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial, base=cfg.model_dump(mode="json"), data=data, stage1_artifact=stage1_artifact,
            artifact_root=artifact_root, reaper=reaper,
        ),
        {"CPU": cfg.tune.trial_driver_cpus},
    )
    tuner = tune.Tuner(
        trainable,
        param_space=search_space(cfg.tune.space),
        tune_config=tune.TuneConfig(
            metric=cfg.tune.metric, mode=cfg.tune.mode, num_samples=cfg.tune.num_samples,
            scheduler=scheduler, search_alg=search_alg, max_concurrent_trials=max_concurrent,
        ),
        run_config=tune.RunConfig(name=experiment, storage_path=fs_root, storage_filesystem=fs, callbacks=[ledger]),
    )
    try:
        with _trials_in_working_dir():
            grid = tuner.fit()
    finally:
        ledger.close()
        _release(reaper)
    rows = [ledger.rows[k] for k in sorted(ledger.rows)]
    best = _pick_best(rows, cfg.tune.metric, cfg.tune.mode)
    best_cfg = apply_best(cfg, best.params)
    path = output or default_output(cfg)
    storage.write_text(path, dump_config(best_cfg), cfg.storage)
    result = SweepResult(
        best_config_path=path, best_trial_id=best.trial_id, best_params=dict(best.params),
        best_metrics=_best_metrics(grid, best.trial_id), best_artifact_uri=best.artifact_uri,
        trials=rows, experiment_path=grid.experiment_path, total_steps=steps,
    )
    if tracker is not None and parent_run_id is not None:
        _log_summary(tracker, parent_run_id, cfg, result, dump_config(best_cfg))
    return result


def _release(reaper: Any, timeout_s: float = 60.0) -> None:
    """Wait until the last stopped trials' placement groups are gone, then end the reaper."""
    deadline = time.monotonic() + timeout_s
    while ray.get(reaper.pending.remote()) and time.monotonic() < deadline:
        ray.get(reaper.reap.remote())
        time.sleep(1.0)
    ray.kill(reaper)


def _pick_best(rows: list[TrialRow], metric: str, mode: str) -> TrialRow:
    """The best trial that ran to its last step (only those have an artifact and a final metric)."""
    done = [r for r in rows if r.status == "TERMINATED" and not r.early_stopped and r.metric is not None]
    if not done:
        failures = "; ".join(f"{r.trial_id}: {r.status}{' ' + r.error if r.error else ''}" for r in rows)
        raise SweepError(f"no trial ran to completion with a {metric!r} value ({failures or 'no trials ran'})")
    pick = min if mode == "min" else max
    return pick(done, key=lambda r: r.metric)  # type: ignore[arg-type, return-value]


def _best_metrics(grid: Any, trial_id: str) -> dict[str, float]:
    for result in grid:
        if (result.metrics or {}).get("trial_id") == trial_id:
            return _metrics(result.metrics)
    return {}


def _log_summary(tracker: Tracker, run_id: str, cfg: PipelineConfig, result: SweepResult, best_yaml: str) -> None:
    """The sweep's outcome on the parent run: trials table, best config, best trial's ids and metric."""
    tracker.log_text(run_id, format_trials(result.trials, cfg.tune.metric, result.total_steps), "sweep/trials.txt")
    tracker.log_text(run_id, best_yaml, "sweep/best_config.yaml")
    best = next(r for r in result.trials if r.trial_id == result.best_trial_id)
    tags = {"duet.sweep.best_trial": best.trial_id, "duet.sweep.experiment_path": result.experiment_path}
    if best.run_id:
        tags["duet.sweep.best_run_id"] = best.run_id
    tracker.set_tags(run_id, tags)
    if best.metric is not None and math.isfinite(best.metric):
        tracker.log_metrics(run_id, {f"sweep_best_{cfg.tune.metric}": best.metric})
