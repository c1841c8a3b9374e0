"""The one module that talks to MLflow tracking: runs, config params, metrics, inputs, lineage, curves.

One parent run per pipeline invocation holds a child run per stage, trial,
evaluation or data step (tag ``duet.kind``). Runs carry the config hash and the
step name so a later invocation can find work already done (``find_run``), and
stage 2 carries stage 1's run id, artifact URI and the dataset digest (lineage).

Where the tracking store is: ``tracking.tracking_uri`` from the config, else
MLflow's own ``MLFLOW_TRACKING_URI``, else an embedded SQLite store
``{work_dir}/mlflow.db`` whose experiment keeps its artifacts in
``{work_dir}/mlartifacts``.

Credentials never reach MLflow: every param, tag and text artifact written here
goes through ``redact``, which drops keys named like credentials and masks
values that look like one (AWS key ids and secrets, ``user:password@`` in URLs,
and the literal values of credential environment variables such as
``AWS_SECRET_ACCESS_KEY`` or ``MLFLOW_TRACKING_TOKEN``).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import mlflow
import mlflow.pyfunc
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, Run, RunStatus, RunTag
from mlflow.environment_variables import MLFLOW_TRACKING_URI
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_PARENT_RUN_ID

from components.config import PipelineConfig, TrackingConfig, environ_snapshot
from components.errors import DuetError

# Tag names shared with the registry and the pipelines.
TAG_KIND = "duet.kind"
TAG_STEP = "duet.step"
TAG_CONFIG_HASH = "duet.config_hash"
TAG_GIT_COMMIT = "duet.git_commit"
TAG_PARENT_STAGE_RUN = "duet.parent_stage_run_id"
TAG_STAGE1_ARTIFACT = "duet.stage1_artifact_uri"
TAG_DATASET_DIGEST = "duet.dataset_digest"
TAG_STAGE1_DATASET_DIGEST = "duet.stage1_dataset_digest"
TAG_ARTIFACT_PREFIX = "duet.artifact."
TAG_ARTIFACT = "duet.artifact.stage"  # the stage artifact URI a stage or trial run wrote
TAG_STEP_HASH = "duet.step_hash"  # what determines a step's output: a finished run with the same hash is reused
TAG_CONTINUES_RUN = "duet.continues_run"  # a stage run that carries on an attempt a tracking outage interrupted
TAG_MODEL_URI = "duet.artifact.model"  # the packaged pyfunc model of a stage-2 run

ChildKind = Literal["stage", "trial", "evaluation", "data"]
CHILD_KINDS: tuple[str, ...] = ("stage", "trial", "evaluation", "data")
PIPELINE_KIND = "pipeline"

_log = logging.getLogger(__name__)

REDACTED = "***"
_MAX_PARAMS_PER_BATCH = 100
_MAX_METRICS_PER_BATCH = 1000
_MAX_PARAM_VALUE = 6000
_MAX_DATASET_DIGEST = 36  # MLflow's column width for dataset digests
_REMOTE_SCHEMES = ("http", "https", "databricks")


class TrackingError(DuetError, RuntimeError):
    """A tracking problem a user can fix; the message says what and how."""


class TrackingUnreachable(TrackingError):
    """The tracking server did not answer: at the start-up probe, or for too long during a stage."""


# ---------------------------------------------------------------- redaction

_SECRET_WORDS = {"key", "keys", "secret", "secrets", "token", "password", "passwd", "pwd", "credential",
                 "credentials", "apikey", "auth"}
_AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[A-Z0-9]{16}\b")
_AWS_SECRET = re.compile(r"(?<![A-Za-z0-9/+=])(?=[A-Za-z0-9/+=]*[A-Z])(?=[A-Za-z0-9/+=]*[a-z])[A-Za-z0-9/+=]{40}"
                         r"(?![A-Za-z0-9/+=])")
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/@:\s]*):(?P<pw>[^/@\s]+)@")
_MIN_ENV_SECRET = 8  # shorter values (true, 0, none) are switches, not secrets; masking them would garble text


def is_secret_name(name: str) -> bool:
    """True when a key or variable name reads like a credential (words split on non-letters and case)."""
    words = re.split(r"[^a-z]+", re.sub(r"([a-z])([A-Z])", r"\1_\2", name).lower())
    return any(w in _SECRET_WORDS for w in words)


# Shell variables whose names only look like credentials (PWD is the working directory, not a password).
_NOT_SECRET_ENV = {"PWD", "OLDPWD"}


def _env_secrets() -> list[str]:
    """Values of credential-named environment variables, so they can be masked wherever they turn up."""
    values = {
        v for k, v in environ_snapshot().items()
        if k not in _NOT_SECRET_ENV and is_secret_name(k) and len(v) >= _MIN_ENV_SECRET
    }
    return sorted(values, key=len, reverse=True)


def redact(text: str) -> str:
    """Mask anything in a string that looks like a credential."""
    for secret in _env_secrets():
        text = text.replace(secret, REDACTED)
    text = _URL_USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{REDACTED}@", text)
    text = _AWS_KEY_ID.sub(REDACTED, text)
    return _AWS_SECRET.sub(REDACTED, text)


def redact_tree(tree: Any) -> Any:
    """A copy of nested dicts/lists with credential-named keys dropped and string values masked."""
    if isinstance(tree, Mapping):
        return {str(k): redact_tree(v) for k, v in tree.items() if not is_secret_name(str(k))}
    if isinstance(tree, list | tuple):
        return [redact_tree(v) for v in tree]
    if isinstance(tree, str):
        return redact(tree)
    return tree


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Dotted-key view of nested dicts; lists become JSON text, None becomes 'null'."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{dotted}."))
        elif isinstance(value, str):
            flat[dotted] = value
        else:
            flat[dotted] = json.dumps(value)
    return flat


# ---------------------------------------------------------------- helpers


def resolve_tracking_uri(cfg: TrackingConfig, work_dir: str) -> str:
    """Config value, else MLFLOW_TRACKING_URI, else the embedded SQLite store under work_dir."""
    if cfg.tracking_uri:
        return cfg.tracking_uri
    from_env = MLFLOW_TRACKING_URI.get()
    if from_env:
        return from_env
    return f"sqlite:///{Path(work_dir).resolve() / 'mlflow.db'}"


def git_commit(path: Path | None = None) -> str | None:
    """Commit of the code that is running, or None outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=path or Path(__file__).resolve().parent,
            capture_output=True, text=True, timeout=10, check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", commit) else None


# MLflow reads its request settings from the environment at each call, and the metrics thread and the
# main thread both make calls: one lock and a count keep nested or overlapping blocks from restoring
# a value another block set (which would leave every later call with no retries).
_FAIL_FAST_LOCK = threading.Lock()
_fail_fast_depth = 0
_fail_fast_saved: dict[str, str | None] = {}


@contextmanager
def fail_fast(timeout_s: float = 15.0) -> Iterator[None]:
    """MLflow requests in this block are tried once, not retried for minutes as by default: for best-effort calls.

    While any thread is inside such a block, every MLflow request of the process fails fast (the
    settings are process-wide); the defaults come back when the last block ends.
    """
    global _fail_fast_depth
    values = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, int(timeout_s)))}
    with _FAIL_FAST_LOCK:
        if _fail_fast_depth == 0:
            _fail_fast_saved.update({k: os.environ.get(k) for k in values})
            os.environ.update(values)
        _fail_fast_depth += 1
    try:
        yield
    finally:
        with _FAIL_FAST_LOCK:
            _fail_fast_depth -= 1
            if _fail_fast_depth == 0:
                for key, old in _fail_fast_saved.items():
                    if old is None:
                        os.environ.pop(key, None)
                    else:
                        os.environ[key] = old
                _fail_fast_saved.clear()


def _now_ms() -> int:
    return int(time.time() * 1000)


def _check_filter_value(name: str, value: str) -> str:
    if "'" in value or "`" in name:
        raise TrackingError(f"find_run: tag {name!r}={value!r} may not contain quotes")
    return value


# ---------------------------------------------------------------- tracker


class Tracker:
    """MLflow runs of one experiment, with credentials kept out of everything logged."""

    def __init__(self, cfg: TrackingConfig, work_dir: str) -> None:
        self.cfg = cfg
        self.work_dir = Path(work_dir)
        self.uri = resolve_tracking_uri(cfg, work_dir)
        self.is_remote = urlsplit(self.uri).scheme in _REMOTE_SCHEMES
        if not self.is_remote:
            self.work_dir.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        self._experiment_id: str | None = None

    @property
    def safe_uri(self) -> str:
        """The tracking URI with any credential masked, for messages."""
        return redact(self.uri)

    @property
    def artifact_location(self) -> str | None:
        """Where a new experiment keeps artifacts: a local folder unless a server decides."""
        return None if self.is_remote else (self.work_dir.resolve() / "mlartifacts").as_uri()

    def check_reachable(self, timeout_s: float = 5.0) -> None:
        """Fail fast, naming the URI and the fix, when the tracking store does not answer."""
        try:
            if self.is_remote:
                with fail_fast(timeout_s):
                    self.client.search_experiments(max_results=1)
            else:
                self.client.search_experiments(max_results=1)
        except Exception as exc:  # any failure here means the store is unusable; say which and how to fix
            reason = redact(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            raise TrackingUnreachable(
                f"MLflow tracking store {self.safe_uri} is unreachable ({reason[:300]}). Start the server "
                "(e.g. `mlflow server --host 127.0.0.1 --port 5000`), fix tracking.tracking_uri or "
                "MLFLOW_TRACKING_URI, or unset both to use the local SQLite store under run.work_dir."
            ) from None

    @contextmanager
    def as_default(self) -> Iterator[None]:
        """Point MLflow's process-wide URIs at this store for a block, for APIs that take no client."""
        old_tracking, old_registry = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_registry_uri(self.uri)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(old_tracking)
            mlflow.set_registry_uri(old_registry)

    # ------------------------------------------------------------ experiment and runs

    @property
    def experiment_id(self) -> str:
        """The configured experiment, created on first use (artifacts local for the embedded store)."""
        if self._experiment_id is None:
            name = self.cfg.experiment
            experiment = self.client.get_experiment_by_name(name)
            if experiment is None:
                try:
                    self._experiment_id = self.client.create_experiment(name, artifact_location=self.artifact_location)
                except MlflowException:  # created concurrently by another process
                    experiment = self.client.get_experiment_by_name(name)
                    if experiment is None:
                        raise
            if experiment is not None:
                if experiment.lifecycle_stage == "deleted":
                    raise TrackingError(
                        f"experiment {name!r} is deleted in {self.safe_uri}: restore it "
                        "(`mlflow experiments restore`) or set tracking.experiment to a new name"
                    )
                self._experiment_id = experiment.experiment_id
        return self._experiment_id

    def _open_run(self, name: str, tags: dict[str, str], run_id: str | None) -> str:
        if run_id is None:
            safe = {k: redact(str(v)) for k, v in tags.items() if not is_secret_name(k)}
            return self.client.create_run(self.experiment_id, run_name=name, tags=safe).info.run_id
        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            raise TrackingError(f"run {run_id!r} not found in {self.safe_uri}: pass an existing run id to resume") from None
        want = tags.get(TAG_KIND)
        if want and run.data.tags.get(TAG_KIND) != want:
            raise TrackingError(f"run {run_id} is a {run.data.tags.get(TAG_KIND)!r} run, not a {want!r} run")
        self.client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        return run_id

    @contextmanager
    def _run(self, name: str, tags: dict[str, str], run_id: str | None) -> Iterator[str]:
        opened = self._open_run(name, tags, run_id)
        try:
            yield opened
        except KeyboardInterrupt:
            self._end_quietly(opened, RunStatus.KILLED)
            raise
        except BaseException:
            self._end_quietly(opened, RunStatus.FAILED)
            raise
        self.client.set_terminated(opened, RunStatus.to_string(RunStatus.FINISHED))

    def _end_quietly(self, run_id: str, status: int) -> None:
        """Mark a failed run; a tracking error here must not hide the error that ended the run (or delay it)."""
        try:
            with fail_fast():
                self.client.set_terminated(run_id, RunStatus.to_string(status))
        except Exception as exc:  # the original exception is re-raised by the caller
            _log.warning("could not mark run %s %s: %s", run_id, RunStatus.to_string(status), redact(str(exc)))

    def parent_run(
        self, name: str, tags: Mapping[str, str] | None = None, run_id: str | None = None
    ) -> AbstractContextManager[str]:
        """Context manager yielding the pipeline's run id; pass run_id to resume an earlier invocation.

        The run ends FINISHED, or FAILED (KILLED on Ctrl-C) when the block raises.
        """
        return self._run(name, {**(tags or {}), TAG_KIND: PIPELINE_KIND}, run_id)

    def child_run(
        self, kind: str, name: str, parent_run_id: str, tags: Mapping[str, str] | None = None,
        run_id: str | None = None,
    ) -> AbstractContextManager[str]:
        """Context manager yielding a stage/trial/evaluation/data run nested under the pipeline run."""
        if kind not in CHILD_KINDS:
            raise TrackingError(f"child_run kind {kind!r} is not one of {', '.join(CHILD_KINDS)}")
        merged = {**(tags or {}), TAG_KIND: kind, TAG_STEP: name, MLFLOW_PARENT_RUN_ID: parent_run_id}
        return self._run(name, merged, run_id)

    def find_run(self, tags: Mapping[str, str], finished_only: bool = True) -> Run | None:
        """Newest run carrying all these tags (e.g. config hash + step), FINISHED unless told otherwise."""
        if not tags:
            raise TrackingError("find_run needs at least one tag to match, e.g. {'duet.config_hash': ...}")
        clauses = [f"tags.`{k}` = '{_check_filter_value(k, str(v))}'" for k, v in tags.items()]
        if finished_only:
            clauses.append("attributes.status = 'FINISHED'")
        runs = self.client.search_runs(
            [self.experiment_id], filter_string=" and ".join(clauses),
            order_by=["attributes.start_time DESC"], max_results=1,
        )
        return runs[0] if runs else None

    # ------------------------------------------------------------ what runs carry

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        """Tags with credential-named keys dropped and values masked."""
        safe = [RunTag(k, redact(str(v))) for k, v in tags.items() if not is_secret_name(k)]
        if safe:
            self.client.log_batch(run_id, tags=safe)

    def log_config(self, run_id: str, cfg: PipelineConfig) -> dict[str, str]:
        """Resolved config as dotted params and a YAML artifact, plus config-hash and git-commit tags.

        Returns the params that were logged (credentials removed).
        """
        tree = redact_tree(cfg.model_dump(mode="json"))
        params = {k: v[:_MAX_PARAM_VALUE] for k, v in flatten(tree).items()}
        items = [Param(k, v) for k, v in params.items()]
        for start in range(0, len(items), _MAX_PARAMS_PER_BATCH):
            try:
                self.client.log_batch(run_id, params=items[start : start + _MAX_PARAMS_PER_BATCH])
            except MlflowException as exc:
                if exc.error_code != "INVALID_PARAMETER_VALUE":
                    raise
                raise TrackingError(
                    f"run {run_id} was logged with a different config ({redact(exc.message)[:300]}); a resumed "
                    "run keeps its config: start a new run (new run.name or no run id) to change it"
                ) from None
        self.client.log_text(run_id, yaml.safe_dump(tree, sort_keys=False), "config/resolved.yaml")
        tags = {TAG_CONFIG_HASH: cfg.hash()}
        commit = git_commit()
        if commit:
            tags[TAG_GIT_COMMIT] = commit
        self.set_tags(run_id, tags)
        return params

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        """All metrics of one step in as few requests as MLflow allows."""
        stamp = _now_ms()
        batch = []
        for key, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TrackingError(f"metric {key!r} must be a number, got {value!r}")
            batch.append(Metric(key, float(value), stamp, int(step)))
        for start in range(0, len(batch), _MAX_METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=batch[start : start + _MAX_METRICS_PER_BATCH])

    def log_dataset(self, run_id: str, name: str, source_uri: str, digest: str, context: str = "training") -> None:
        """Record a dataset version as a run input; its digest is the shard manifest's digest.

        MLflow stores at most 36 characters of digest; a longer one is cut there and kept
        whole in the dataset's profile (and in the ``duet.dataset_digest`` lineage tag).
        """
        if not digest or not isinstance(digest, str):
            raise TrackingError(f"log_dataset {name!r}: digest must be the manifest's digest, got {digest!r}")
        safe_uri = redact(source_uri)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MLflow warns when a local path matches two source kinds
            source = resolve_dataset_source(safe_uri)
        dataset = Dataset(
            name=name, digest=digest[:_MAX_DATASET_DIGEST], source_type=source._get_source_type(),
            source=source.to_json(), profile=json.dumps({"manifest_digest": digest}),
        )
        self.client.log_inputs(run_id, [DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])])

    def tag_lineage(
        self, stage2_run_id: str, stage1_run_id: str | None, stage1_artifact_uri: str, dataset_digest: str,
        stage1_data_digest: str | None = None,
    ) -> None:
        """Tie a stage-2 run to the stage-1 artifact it started from, the run that wrote it, and its data.

        `stage1_run_id` None: the artifact came by URI from a run this store does not hold; the
        artifact URI and the digests (from its artifact.json) are still tagged.
        """
        if stage1_run_id is not None and not self.run_exists(stage1_run_id):
            raise TrackingError(f"tag_lineage: stage-1 run {stage1_run_id!r} not found in {self.safe_uri}")
        tags = {TAG_STAGE1_ARTIFACT: stage1_artifact_uri, TAG_DATASET_DIGEST: dataset_digest}
        if stage1_run_id is not None:
            tags[TAG_PARENT_STAGE_RUN] = stage1_run_id
        if stage1_data_digest:
            tags[TAG_STAGE1_DATASET_DIGEST] = stage1_data_digest
        self.set_tags(stage2_run_id, tags)

    def run_exists(self, run_id: str) -> bool:
        """True when this store holds a run with that id."""
        if not run_id:
            return False
        try:
            self.client.get_run(run_id)
        except MlflowException:
            return False
        return True

    def log_artifact_uri(self, run_id: str, key: str, uri: str) -> None:
        """Point a run at an artifact stored elsewhere (checkpoint, shards) with a ``duet.artifact.KEY`` tag."""
        self.set_tags(run_id, {f"{TAG_ARTIFACT_PREFIX}{key}": uri})

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        """A text artifact, credentials masked."""
        self.client.log_text(run_id, redact(text), artifact_file)

    def log_curves(self, run_id: str, history: Sequence[Mapping[str, Any]], artifact_dir: str = "curves") -> list[str]:
        """Loss and learning-rate plots (PNG) and the metric table (JSON, CSV) of a training history.

        Each history row is one logged step; ``step`` is its x value (the row index when
        absent); columns with "loss" in the name go on the loss plot, ``lr``/``lr_*``/
        ``*learning_rate*`` columns on the learning-rate plot. Returns the artifact paths.
        """
        if not history:
            return []
        rows = [dict(r) for r in history]
        steps = [r.get("step", i) for i, r in enumerate(rows)]
        columns = list(dict.fromkeys(k for r in rows for k in r))
        loss_cols = [c for c in columns if "loss" in c.lower()]
        lr_cols = [c for c in columns if c.lower() == "lr" or c.lower().startswith("lr_") or "learning_rate" in c.lower()]
        written = []
        with tempfile.TemporaryDirectory() as tmp:
            for file, cols, label, log_scale in [
                ("loss.png", loss_cols, "loss", False), ("learning_rate.png", lr_cols, "learning rate", True),
            ]:
                if cols and _plot(Path(tmp, file), steps, rows, cols, label, log_scale):
                    written.append(file)
            Path(tmp, "history.json").write_text(redact(json.dumps(rows, indent=1, default=str)))
            Path(tmp, "history.csv").write_text(redact(_csv(rows, columns)))
            written += ["history.json", "history.csv"]
            self.client.log_artifacts(run_id, tmp, artifact_dir)
        return [f"{artifact_dir}/{f}" for f in written]

    def log_pyfunc(
        self, run_id: str, name: str, python_model: mlflow.pyfunc.PythonModel, *,
        artifacts: Mapping[str, str] | None = None, pip_requirements: Sequence[str] | None = None,
        code_paths: Sequence[str] | None = None,
    ) -> str:
        """Log a pyfunc model under a run and return its ``runs:/RUN/NAME`` URI for registration.

        The run's status is left alone (the run may still be in progress). The logged-model
        record is created here, in the run's own experiment, because MLflow would otherwise
        file it under the process's active (default) experiment.
        """
        run = self.client.get_run(run_id)
        model = self.client.create_logged_model(
            run.info.experiment_id, name=name, source_run_id=run_id, params=dict(run.data.params)
        )
        with self.as_default():
            Model.log(
                artifact_path=None, name=name, flavor=mlflow.pyfunc, run_id=run_id, model_id=model.model_id,
                python_model=python_model,
                artifacts=dict(artifacts) if artifacts else None,
                pip_requirements=list(pip_requirements) if pip_requirements is not None else None,
                code_paths=list(code_paths) if code_paths else None,
            )
        return f"runs:/{run_id}/{name}"


# ---------------------------------------------------------------- metrics that outlive an outage


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


# ---------------------------------------------------------------- curves


def _plot(path: Path, steps: list[Any], rows: list[dict[str, Any]], cols: list[str], label: str, log: bool) -> bool:
    """Draw one figure with a line per column; False when no column has a numeric value."""
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    drawn = False
    for col in cols:
        points = [(s, r[col]) for s, r in zip(steps, rows) if isinstance(r.get(col), int | float)]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, label=col)
            drawn = True
    if not drawn:
        return False
    if log and all(y > 0 for c in cols for r in rows if isinstance(y := r.get(c), int | float)):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return True


def _csv(rows: list[dict[str, Any]], columns: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()
