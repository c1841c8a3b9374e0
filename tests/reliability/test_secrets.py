"""Credentials never leave the process: not into MLflow (params, tags, inputs, artifacts, the server's own
files), not into the dataset written to object storage, not into log output or error messages.

Fake AWS keys and an MLflow token are planted in the environment and a password in the S3 endpoint URL;
a real data step runs against the S3 endpoint on 127.0.0.1 and is tracked on a real `mlflow server`,
then the same step runs against a stopped endpoint. (tests/test_tracking.py covers the Tracker calls one
by one; this is the data step end to end, plus storage failures.)
"""

from __future__ import annotations

import logging
import secrets
import string
import time
import uuid
from pathlib import Path

import pytest
from conftest import S3Endpoint, free_port
from hypothesis import given, settings
from hypothesis import strategies as st
from mlflow_server import MlflowServer, mlflow_server  # noqa: F401  (session fixture)

from components import storage
from components.config import DuetConfig, StorageSection, TrackingSection, load_config
from components.storage import StorageError
from components.tracking.redact import REDACTED, redact
from components.tracking.tracker import Tracker
from components.workflow.startup import ensure_dataset


def _planted(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Fresh fake credentials in the environment (what the AWS SDK and MLflow read), plus an endpoint password."""
    alphabet = string.ascii_uppercase + string.digits
    values = {
        "AWS_ACCESS_KEY_ID": "AKIA" + "".join(secrets.choice(alphabet) for _ in range(16)),
        "AWS_SECRET_ACCESS_KEY": "Sk" + secrets.token_urlsafe(30)[:38].replace("-", "+").replace("_", "/"),
        "AWS_SESSION_TOKEN": "FwoGZX" + secrets.token_hex(40),
        "MLFLOW_TRACKING_TOKEN": "mlflow-" + secrets.token_hex(16),
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return {**values, "endpoint password": "pw-" + secrets.token_hex(8)}


def _config(work: Path, root: str, endpoint: str, password: str) -> DuetConfig:
    host = endpoint.removeprefix("http://")
    return load_config(None, [
        f"run.work_dir={work}", f"data.root={root}", "data.num_records=24", "data.caption_records=8",
        "data.records_per_shard=8", "data.image_size=24", f"storage.endpoint_url=http://minio:{password}@{host}",
        "storage.retries=0", "storage.connect_timeout_s=2", "storage.request_timeout_s=5",
    ])


def _leaks(texts: list[str], blobs: list[bytes], planted: dict[str, str]) -> list[str]:
    found = []
    for name, value in planted.items():
        found += [f"{name} in text: ...{t[max(0, t.find(value) - 60):t.find(value)]}" for t in texts if value in t]
        found += [f"{name} in a stored file" for b in blobs if value.encode() in b]
    return found


def test_a_tracked_data_step_and_its_storage_failures_leak_nothing(
    mlflow_server: MlflowServer,  # noqa: F811
    s3_endpoint: S3Endpoint,
    s3_bucket: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    planted = _planted(monkeypatch)
    password = planted["endpoint password"]
    caplog.set_level(logging.DEBUG)
    cfg = _config(tmp_path, f"{s3_bucket}/datasets", s3_endpoint.url, password)
    tracker = Tracker(TrackingSection(tracking_uri=mlflow_server.uri, experiment=f"secrets-{uuid.uuid4().hex[:8]}"),
                      str(tmp_path))
    tracker.check_reachable()

    with tracker.parent_run("secrets", tags={"endpoint": cfg.storage.endpoint_url or ""}) as parent:
        params = tracker.log_config(parent, cfg)
        with tracker.child_run("data", "data", parent) as data_run:
            splits = ensure_dataset(cfg)  # real shards on the S3 endpoint; credentials from the environment
            for split in splits.values():
                tracker.log_dataset(data_run, f"shapes/{split.split}", split.uri, split.manifest.digest)
            tracker.log_curves(data_run, [{"step": 1, "loss": 1.0, "note": str(cfg.storage.endpoint_url)}])

        # The endpoint goes away: the step fails with a StorageError that names the endpoint, not a secret.
        stopped = _config(tmp_path, f"{s3_bucket}/datasets2", f"http://127.0.0.1:{free_port()}", password)
        with pytest.raises(StorageError) as err:
            with tracker.child_run("data", "data-unreachable", parent):
                ensure_dataset(stopped)
        tracker.log_text(parent, f"data step failed: {err.value!r}", "errors/data.txt")
        tracker.set_tags(parent, {"error": str(err.value)})
    time.sleep(0.5)  # the server writes its log asynchronously

    assert "127.0.0.1" in str(err.value) and password not in str(err.value)
    assert params["storage.endpoint_url"] == f"http://minio:{REDACTED}@{s3_endpoint.url.removeprefix('http://')}"
    assert len(splits) == 4 and all(s.manifest.count for s in splits.values())

    texts: list[str] = [str(err.value)]
    runs = tracker.client.search_runs([tracker.experiment_id])
    assert {r.info.status for r in runs} == {"FINISHED", "FAILED"} and len(runs) == 3
    for run in runs:
        texts += [f"{k}={v}" for k, v in {**run.data.params, **run.data.tags}.items()]
        texts += [d.dataset.source + d.dataset.profile for d in run.inputs.dataset_inputs]
        texts += [f.path for f in tracker.client.list_artifacts(run.info.run_id)]
    server_files = [p.read_bytes() for p in mlflow_server.root.rglob("*") if p.is_file()]
    assert any(b"errors/data.txt" in b or b"data step failed" in b for b in server_files)
    dataset_files = [storage.read_bytes(uri, cfg.storage) for uri in storage.list_files(s3_bucket, cfg=cfg.storage)]
    assert any(uri.endswith("manifest.json") for uri in storage.list_files(s3_bucket, cfg=cfg.storage))
    local_files = [p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()]
    captured = capfd.readouterr()
    texts += [caplog.text, captured.out, captured.err]
    assert "writing split" in captured.out and "failed (attempt 1/" in caplog.text  # the logs were captured
    assert not _leaks(texts, server_files + dataset_files + local_files, planted)


# Characters RFC 3986 allows unencoded in a URL's user-info, plus percent-escapes.
USERINFO = string.ascii_letters + string.digits + "-._~!$&'()*+,;=%"


@settings(max_examples=200, deadline=None, derandomize=True)
@given(user=st.text(USERINFO.replace(":", ""), max_size=12), password=st.text(USERINFO + ":", min_size=1, max_size=40),
       scheme=st.sampled_from(["http", "https", "s3", "postgresql+psycopg2"]))
def test_any_valid_userinfo_password_is_masked(user: str, password: str, scheme: str) -> None:
    url = f"{scheme}://{user}:{password}@db.example:5432/x"
    assert redact(f"endpoint {url} failed") == f"endpoint {scheme}://{user}:{REDACTED}@db.example:5432/x failed"
    assert storage.describe_endpoint("s3://b/k", StorageSection(endpoint_url=url)) == f"{scheme}://db.example:5432"
