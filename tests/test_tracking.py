"""Tracking against a real `mlflow server`: run tree, lineage, inputs, params, curves, secrets, reachability."""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from pathlib import Path

import mlflow.pyfunc
import pytest
from mlflow_server import MlflowServer, mlflow_server  # noqa: F401  (session fixture)

from components.config import DuetConfig, TrackingSection, load_config
from components.tracking.redact import REDACTED, flatten, is_secret_name, redact
from components.tracking.tags import (
    TAG_CONFIG_HASH,
    TAG_DATASET_DIGEST,
    TAG_KIND,
    TAG_PARENT_STAGE_RUN,
    TAG_STAGE1_ARTIFACT,
    TAG_STEP,
)
from components.tracking.tracker import Tracker, TrackingError, TrackingUnreachable, resolve_tracking_uri

HISTORY = [{"step": s, "loss": 2.0 / (s + 1), "val_loss": 2.5 / (s + 1), "lr": 1e-3 * (s + 1) / 4} for s in range(4)]


def _tracker(server: MlflowServer) -> Tracker:
    return Tracker(TrackingSection(tracking_uri=server.uri, experiment=f"test-{uuid.uuid4().hex[:8]}"), "unused")


# ---------------------------------------------------------------- pure parts


def test_uri_resolution_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(TrackingSection(), str(tmp_path)) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env-host:5000")
    assert resolve_tracking_uri(TrackingSection(), str(tmp_path)) == "http://env-host:5000"
    cfg = TrackingSection(tracking_uri="http://cfg-host:5000")
    assert resolve_tracking_uri(cfg, str(tmp_path)) == "http://cfg-host:5000"


@pytest.mark.parametrize(
    ("name", "secret"),
    [("aws_secret_access_key", True), ("AWS_ACCESS_KEY_ID", True), ("MLFLOW_TRACKING_TOKEN", True),
     ("apiKey", True), ("db_password", True), ("credentials", True), ("max_new_tokens", False),
     ("keyframe_rate", False), ("endpoint_url", False), ("monkey", False)],
)
def test_secret_names(name: str, secret: bool) -> None:
    assert is_secret_name(name) is secret


def test_redact_patterns() -> None:
    assert redact("http://alice:s3cr3t@minio:9000/x") == f"http://alice:{REDACTED}@minio:9000/x"
    assert redact("key AKIAIOSFODNN7EXAMPLE here") == f"key {REDACTED} here"
    assert REDACTED in redact("wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    commit = "0d23895c1c61e6aa0e2a03a5bacb2f00aa11bb22"  # lower-case hex (git ids, digests) is not a secret
    assert redact(commit) == commit
    assert redact("s3://bucket/datasets/synthetic/v1") == "s3://bucket/datasets/synthetic/v1"


def test_flatten_dotted_keys() -> None:
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": None, "e": "x"}) == {"a.b": "1", "a.c": "[1, 2]", "d": "null", "e": "x"}


# ---------------------------------------------------------------- embedded default


def test_embedded_default_keeps_everything_under_work_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracker = Tracker(TrackingSection(experiment="embedded"), str(tmp_path / "work"))
    tracker.check_reachable()
    with tracker.parent_run("demo") as run_id:
        tracker.log_text(run_id, "hello", "notes/hello.txt")
    run = tracker.client.get_run(run_id)
    assert run.info.artifact_uri.startswith((tmp_path / "work" / "mlartifacts").resolve().as_uri())
    assert (tmp_path / "work" / "mlflow.db").is_file()
    assert list((tmp_path / "work" / "mlartifacts").rglob("hello.txt"))


# ---------------------------------------------------------------- against the server


def test_two_stage_run_tree_lineage_inputs_and_params(mlflow_server: MlflowServer) -> None:  # noqa: F811
    tracker = _tracker(mlflow_server)
    tracker.check_reachable()
    cfg = load_config(None, ["adapter.r=64", "run.name=two-stage"])
    digest = "sha256:" + "ab" * 32
    with tracker.parent_run("two-stage", tags={"duet.pipeline": "full"}) as parent:
        tracker.log_config(parent, cfg)
        with tracker.child_run("data", "prepare_data", parent) as data_run:
            tracker.log_dataset(data_run, "synthetic", "s3://bucket/datasets/synthetic/v1", digest, "training")
        with tracker.child_run("stage", "stage1", parent) as stage1:
            tracker.log_config(stage1, cfg)
            tracker.log_metrics(stage1, {"loss": 1.5, "tokens_per_s": 100}, step=3)
            tracker.log_artifact_uri(stage1, "checkpoint", "s3://bucket/runs/stage1/ckpt")
            curves = tracker.log_curves(stage1, HISTORY)
        with tracker.child_run("stage", "stage2", parent) as stage2:
            tracker.log_dataset(stage2, "synthetic", "s3://bucket/datasets/synthetic/v1", digest, "training")
            tracker.tag_lineage(stage2, stage1, "s3://bucket/runs/stage1/ckpt", digest)

    client = tracker.client
    children = client.search_runs([tracker.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert {r.info.run_id for r in children} == {data_run, stage1, stage2}
    assert {r.data.tags[TAG_KIND] for r in children} == {"data", "stage"}
    assert client.get_run(parent).data.tags[TAG_KIND] == "pipeline"
    assert all(r.info.status == "FINISHED" for r in [*children, client.get_run(parent)])

    s2 = client.get_run(stage2)
    assert s2.data.tags[TAG_PARENT_STAGE_RUN] == stage1
    assert s2.data.tags[TAG_STAGE1_ARTIFACT] == "s3://bucket/runs/stage1/ckpt"
    assert s2.data.tags[TAG_DATASET_DIGEST] == digest
    (ds_input,) = s2.inputs.dataset_inputs
    assert ds_input.dataset.name == "synthetic"
    assert ds_input.dataset.digest == digest[:36]
    assert digest in ds_input.dataset.profile
    assert "s3://bucket/datasets/synthetic/v1" in ds_input.dataset.source
    assert {t.key: t.value for t in ds_input.tags}["mlflow.data.context"] == "training"

    s1 = client.get_run(stage1)
    assert s1.data.params["adapter.r"] == "64"
    assert s1.data.params["vce.reference_layers"] == "[-8, -14, -20]"
    assert s1.data.params["eval.max_new_tokens"] == "64"
    assert s1.data.params["data.input"] == "null"
    assert s1.data.tags[TAG_CONFIG_HASH] == cfg.hash()
    assert s1.data.tags["duet.artifact.checkpoint"] == "s3://bucket/runs/stage1/ckpt"
    assert s1.data.metrics == {"loss": 1.5, "tokens_per_s": 100.0}
    assert client.get_metric_history(stage1, "loss")[0].step == 3

    artifacts = {a.path for a in client.list_artifacts(stage1, "curves")}
    assert set(curves) == artifacts == {
        "curves/loss.png", "curves/learning_rate.png", "curves/history.json", "curves/history.csv",
    }
    local = Path(client.download_artifacts(stage1, "curves"))
    assert (local / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (local / "history.csv").read_text().splitlines()[0] == "step,loss,val_loss,lr"
    logged = load_config(Path(client.download_artifacts(stage1, "config/resolved.yaml")))
    assert logged == cfg

    found = tracker.find_run({TAG_CONFIG_HASH: cfg.hash(), TAG_STEP: "stage1"})
    assert found is not None and found.info.run_id == stage1
    assert tracker.find_run({TAG_CONFIG_HASH: "0" * 16, TAG_STEP: "stage1"}) is None


def test_runs_fail_and_resume(mlflow_server: MlflowServer) -> None:  # noqa: F811
    tracker = _tracker(mlflow_server)
    with pytest.raises(RuntimeError, match="boom"), tracker.parent_run("flaky") as parent:
        with tracker.child_run("stage", "stage1", parent) as child:
            raise RuntimeError("boom")
    assert tracker.client.get_run(parent).info.status == "FAILED"
    assert tracker.client.get_run(child).info.status == "FAILED"
    assert tracker.find_run({TAG_STEP: "stage1"}) is None
    assert tracker.find_run({TAG_STEP: "stage1"}, finished_only=False).info.run_id == child

    with tracker.parent_run("flaky", run_id=parent) as resumed:
        with tracker.child_run("stage", "stage1", resumed, run_id=child) as child_again:
            tracker.log_metrics(child_again, {"loss": 0.5})
    assert (resumed, child_again) == (parent, child)
    assert tracker.client.get_run(parent).info.status == "FINISHED"
    assert tracker.find_run({TAG_STEP: "stage1"}).info.run_id == child

    tracker.log_config(parent, load_config())
    with pytest.raises(TrackingError, match="different config"):
        tracker.log_config(parent, load_config(None, ["adapter.r=8"]))
    with pytest.raises(TrackingError, match="not a 'pipeline' run"), tracker.parent_run("x", run_id=child):
        pass
    with pytest.raises(TrackingError, match="kind 'stagee' is not one of"):
        tracker.child_run("stagee", "s", parent)
    with pytest.raises(TrackingError, match="metric 'loss' must be a number"):
        tracker.log_metrics(parent, {"loss": "low"})
    with pytest.raises(TrackingError, match="not found"):
        tracker.tag_lineage(parent, "0" * 32, "s3://b/x", "d")


class _EchoModel(mlflow.pyfunc.PythonModel):
    """Smallest real pyfunc: answers what it is asked."""

    def predict(self, model_input: list[str], params: dict | None = None) -> list[str]:
        return model_input


def test_secrets_appear_nowhere(
    mlflow_server: MlflowServer,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    key_id, secret = "AKIAQWERTYUIOPASDF12", "Zx9+Qw8/Er7Ty6Ui5Op4As3Df2Gh1Jk0LmNbVcXzAq"[:40]
    token, password = f"tok-{uuid.uuid4().hex}", f"pw{uuid.uuid4().hex[:12]}"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", token)
    caplog.set_level(logging.DEBUG)
    planted = [key_id, secret, token, password]

    tracker = _tracker(mlflow_server)
    cfg: DuetConfig = load_config(None, [
        f"storage.endpoint_url=http://minio:{password}@127.0.0.1:9000",
        f"data.input=s3://bucket/{key_id}/llava.json",
        f"data.image_root=s3://bucket/{secret}/images",
    ])
    with tracker.parent_run("secret-check", tags={"note": f"token {token}", "api_token": token}) as parent:
        params = tracker.log_config(parent, cfg)
        with tracker.child_run("stage", "stage1", parent, tags={"endpoint": f"http://u:{password}@h"}) as stage1:
            tracker.log_config(stage1, cfg)
            tracker.log_metrics(stage1, {"loss": 1.0})
            tracker.log_curves(stage1, HISTORY)
            tracker.log_artifact_uri(stage1, "checkpoint", f"s3://bucket/{key_id}/ckpt")
            tracker.log_text(stage1, f"env dump AWS_SECRET_ACCESS_KEY={secret} token={token}", "debug/env.txt")
            tracker.log_pyfunc(stage1, "model", _EchoModel(), pip_requirements=["mlflow"])
        with tracker.child_run("data", "prepare_data", parent) as data_run:
            tracker.log_dataset(data_run, "llava", f"s3://{key_id}:{password}@bucket/ds", "digest-1", "training")
            tracker.tag_lineage(data_run, stage1, f"http://u:{password}@h/stage1", "digest-1")
    time.sleep(0.5)  # let the server flush its log

    assert params["storage.endpoint_url"] == f"http://minio:{REDACTED}@127.0.0.1:9000"
    assert params["data.input"] == f"s3://bucket/{REDACTED}/llava.json"

    runs = tracker.client.search_runs([tracker.experiment_id])
    assert len(runs) == 3
    texts = []
    for run in runs:
        texts += [f"{k}={v}" for k, v in {**run.data.params, **run.data.tags}.items()]
        texts += [d.dataset.source + d.dataset.profile for d in run.inputs.dataset_inputs]
    for model in tracker.client.search_logged_models([tracker.experiment_id]):
        texts += [f"{k}={v}" for k, v in {**model.params, **model.tags}.items()]
    stored = [p.read_bytes() for p in mlflow_server.root.rglob("*") if p.is_file()]  # db, artifacts, server log
    assert any(b"config/resolved.yaml" in b or b"model_uuid" in b for b in stored)
    captured = capfd.readouterr()
    logs = [caplog.text, captured.out, captured.err]
    for value in planted:
        assert not [t for t in texts if value in t], f"{value} found in params/tags/inputs"
        assert not [b for b in stored if value.encode() in b], f"{value} found in a stored file"
        assert not [t for t in logs if value in t], f"{value} found in log output"


def test_unreachable_server_fails_fast_with_a_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    from ports import free_port

    uri = f"http://alice:hunter2secret@127.0.0.1:{free_port()}"
    tracker = Tracker(TrackingSection(tracking_uri=uri), "unused")
    start = time.monotonic()
    with pytest.raises(TrackingUnreachable) as err:
        tracker.check_reachable(timeout_s=2)
    assert time.monotonic() - start < 15
    message = str(err.value)
    assert "127.0.0.1" in message and "mlflow server" in message and "MLFLOW_TRACKING_URI" in message
    assert "hunter2secret" not in message


def test_redaction_does_not_race_threads_that_change_the_environment() -> None:
    """MLflow's telemetry thread removes a variable while the sweep's driver masks a text (a KeyError once)."""
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            os.environ["_DUET_TEST_CHURN"] = "x"
            os.environ.pop("_DUET_TEST_CHURN", None)

    thread = threading.Thread(target=churn, daemon=True)
    thread.start()
    try:
        for _ in range(3000):
            assert redact("nothing secret here") == "nothing secret here"
    finally:
        stop.set()
        thread.join()


def test_as_default_leaves_the_process_uris_as_it_found_them(tmp_path, monkeypatch) -> None:
    """Restoring the resolved defaults would pin them into MLFLOW_*_URI for every later client."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils

    from components.config import TrackingSection
    from components.tracking.tracker import Tracker

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    before = registry_utils._registry_uri
    tracker = Tracker(TrackingSection(tracking_uri=f"sqlite:///{tmp_path / 'a.db'}"), str(tmp_path))
    with tracker.as_default():
        assert mlflow.get_registry_uri() == tracker.uri
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_REGISTRY_URI" not in os.environ
    assert registry_utils._registry_uri == before
