"""The one module that talks to MLflow tracking: runs, config params, metrics, inputs, lineage, models.

One parent run per pipeline invocation holds a child run per stage, trial,
evaluation or data step (tag ``duet.kind``). Runs carry the config hash and the
step name so a later invocation can find work already done (``find_run``), and
stage 2 carries stage 1's run id, artifact URI and the dataset digest (lineage).

Where the tracking store is: ``tracking.tracking_uri`` from the config, else
MLflow's own ``MLFLOW_TRACKING_URI``, else an embedded SQLite store under
``run.work_dir`` (components/layout.py) whose experiment keeps its artifacts beside it.
Every param, tag and text artifact written here goes through components/tracking/redact.py.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import mlflow
import mlflow.pyfunc
import yaml
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, Run, RunStatus, RunTag
from mlflow.environment_variables import MLFLOW_TRACKING_URI
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_PARENT_RUN_ID

from components import storage
from components.config import DuetConfig, TrackingSection
from components.errors import DuetError
from components.layout import tracking_artifacts_uri, tracking_store_uri
from components.tracking.curves import write_curves
from components.tracking.redact import flatten, is_secret_name, redact, redact_tree
from components.tracking.tags import (
    CHILD_KINDS,
    PIPELINE_KIND,
    TAG_ARTIFACT_PREFIX,
    TAG_CONFIG_HASH,
    TAG_DATASET_DIGEST,
    TAG_GIT_COMMIT,
    TAG_KIND,
    TAG_PARENT_STAGE_RUN,
    TAG_STAGE1_ARTIFACT,
    TAG_STAGE1_DATASET_DIGEST,
    TAG_STEP,
)

_log = logging.getLogger(__name__)


_MAX_PARAMS_PER_BATCH = 100


_MAX_METRICS_PER_BATCH = 1000


_MAX_PARAM_VALUE = 6000


_MAX_DATASET_DIGEST = 36  # MLflow's column width for dataset digests


_REMOTE_SCHEMES = ("http", "https", "databricks")

# Retries of duet's own storage layer (components/storage.py, `retry_count`): on a pipeline run, this
# process's since it started; on a stage run, the driver's during the stage (components/workflow/tracked_stage.py).
STORAGE_RETRIES = "storage/retries"


class TrackingError(DuetError, RuntimeError):
    """A tracking problem a user can fix; the message says what and how."""


class TrackingUnreachable(TrackingError):
    """The tracking server did not answer: at the start-up probe, or for too long during a stage."""


def resolve_tracking_uri(cfg: TrackingSection, work_dir: str) -> str:
    """Config value, else MLFLOW_TRACKING_URI, else the embedded SQLite store under work_dir."""
    if cfg.tracking_uri:
        return cfg.tracking_uri
    from_env = MLFLOW_TRACKING_URI.get()
    if from_env:
        return from_env
    return tracking_store_uri(work_dir)


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


class Tracker:
    """MLflow runs of one experiment, with credentials kept out of everything logged."""

    def __init__(self, cfg: TrackingSection, work_dir: str) -> None:
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
        return None if self.is_remote else tracking_artifacts_uri(self.work_dir)

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
        """Point MLflow's process-wide URIs at this store for a block, for APIs that take no client.

        Afterwards the process is as before, unset URIs unset: restoring the *resolved* defaults instead
        (mlflow.get_tracking_uri()) would pin them, and write them into MLFLOW_TRACKING_URI and
        MLFLOW_REGISTRY_URI for every later client and subprocess.
        """
        from mlflow.tracking._model_registry import utils as registry_utils
        from mlflow.tracking._tracking_service import utils as tracking_utils

        names = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
        saved_env = {name: os.environ.get(name) for name in names}
        saved_tracking, saved_registry = tracking_utils._tracking_uri, registry_utils._registry_uri
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_registry_uri(self.uri)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(saved_tracking)  # None unsets it
            registry_utils._registry_uri = saved_registry
            for name, value in saved_env.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value

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
    def _run(self, name: str, tags: dict[str, str], run_id: str | None,
             on_finish: Callable[[str], None] | None = None) -> Iterator[str]:
        opened = self._open_run(name, tags, run_id)
        try:
            yield opened
        except KeyboardInterrupt:
            self._end_quietly(opened, RunStatus.KILLED)
            raise
        except BaseException:
            self._end_quietly(opened, RunStatus.FAILED)
            raise
        if on_finish is not None:
            on_finish(opened)
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

        The run ends FINISHED, or FAILED (KILLED on Ctrl-C) when the block raises. A finished run
        carries `storage/retries`: the whole-operation retries duet's storage layer made in this
        process (the driver) since it started, the data preparation before the run opened included
        (`components.storage.retry_count`: retries inside pyarrow's S3 client and in Ray workers are not in it).
        """
        return self._run(name, {**(tags or {}), TAG_KIND: PIPELINE_KIND}, run_id,
                         on_finish=lambda run: self.log_metrics(run, {STORAGE_RETRIES: storage.retry_count()}))

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

    def log_config(self, run_id: str, cfg: DuetConfig) -> dict[str, str]:
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
        """Loss and learning-rate plots and the metric table of a training history (components/tracking/curves.py)
        as artifacts under `artifact_dir`; returns their artifact paths."""
        if not history:
            return []
        with tempfile.TemporaryDirectory() as tmp:
            written = write_curves(history, Path(tmp))
            self.client.log_artifacts(run_id, tmp, artifact_dir)
        return [f"{artifact_dir}/{f}" for f in written]

    def log_pyfunc(
        self, run_id: str, name: str, python_model: mlflow.pyfunc.PythonModel, *,
        artifacts: Mapping[str, str] | None = None, pip_requirements: Sequence[str] | None = None,
        code_paths: Sequence[str] | None = None, signature: ModelSignature | None = None,
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
        with self.as_default(), warnings.catch_warnings():
            # The signature is given; an input example would run the model at logging time, so none is.
            # MLflow wraps the message in terminal colour codes, so it is matched anywhere in the text.
            warnings.filterwarnings("ignore", message=".*An input example was not provided", category=UserWarning)
            Model.log(
                artifact_path=None, name=name, flavor=mlflow.pyfunc, run_id=run_id, model_id=model.model_id,
                python_model=python_model,
                artifacts=dict(artifacts) if artifacts else None,
                pip_requirements=list(pip_requirements) if pip_requirements is not None else None,
                code_paths=list(code_paths) if code_paths else None,
                signature=signature,
            )
        return f"runs:/{run_id}/{name}"
