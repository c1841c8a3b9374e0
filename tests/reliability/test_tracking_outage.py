"""The tracking server lost mid-run: training goes on, metrics wait, nothing is lost.

A real `mlflow server` on 127.0.0.1 sits behind a FlakyProxy, so cutting the proxy is the network
path (or a load balancer) failing while the server keeps its state. Documented behaviour (README,
"The full pipeline"): per-step metrics are buffered while the server is away and sent when it is
back; a stage that finishes training while it is still away waits `tracking.outage_timeout_s`, then
fails with a message naming the store and the file its metrics were kept in; checkpoints and the
artifact never depend on MLflow, and a re-run resumes from the last checkpoint and logs those metrics.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import free_port
from flaky_proxy import FlakyProxy
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from mlflow_server import MlflowServer, mlflow_server  # noqa: F401  (fixture)
from pipeline_runs import REPO, STEPS, end_leftovers, last_checkpoint_step, pretrain_command

from components.config import TrackingSection
from components.tracking.buffer import MetricsBuffer
from components.tracking.tracker import Tracker

pytestmark = pytest.mark.timeout(600)


@pytest.fixture
def proxied(mlflow_server: MlflowServer) -> Iterator[FlakyProxy]:  # noqa: F811
    """A FlakyProxy in front of the session's MLflow server."""
    port = int(mlflow_server.uri.rsplit(":", 1)[1])
    proxy = FlakyProxy(free_port(), port)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()


def _tracker(proxy: FlakyProxy, tmp_path: Path) -> tuple[Tracker, str]:
    tracker = Tracker(TrackingSection(tracking_uri=proxy.url, experiment=f"outage-{uuid.uuid4().hex[:8]}"),
                      str(tmp_path))
    run_id = tracker.client.create_run(tracker.experiment_id).info.run_id
    return tracker, run_id


def _steps(server_uri: str, run_id: str, key: str = "loss") -> list[int]:
    """Steps of one metric as the server holds them (asked directly, not through the proxy)."""
    return [m.step for m in sorted(MlflowClient(server_uri).get_metric_history(run_id, key), key=lambda m: m.step)]


def _row(step: int) -> dict[str, float]:
    return {"step": step, "loss": 1.0 / step, "tokens_per_s": 100.0 + step}


# ---------------------------------------------------------------- the buffer


def test_metrics_wait_out_an_outage_and_arrive_in_order(
    proxied: FlakyProxy, mlflow_server: MlflowServer, tmp_path: Path  # noqa: F811
) -> None:
    tracker, run_id = _tracker(proxied, tmp_path)
    buffer = MetricsBuffer(tracker, run_id)
    buffer.add([_row(1), _row(2)])
    assert buffer.pending == 0 and _steps(mlflow_server.uri, run_id) == [1, 2]

    proxied.cut()
    started = time.monotonic()
    for step in range(3, 9):
        buffer.add([_row(step)])
    assert time.monotonic() - started < 10, "training does not wait on an unreachable tracking store"
    assert buffer.pending == 6 and _steps(mlflow_server.uri, run_id) == [1, 2]

    proxied.resume()
    buffer.add([_row(9)])
    assert buffer.pending == 0
    assert _steps(mlflow_server.uri, run_id) == list(range(1, 10))
    history = MlflowClient(mlflow_server.uri).get_metric_history(run_id, "tokens_per_s")
    assert sorted((m.step, m.value) for m in history) == [(s, 100.0 + s) for s in range(1, 10)]
    assert [r["step"] for r in buffer.rows] == list(range(1, 10))


def test_close_waits_for_the_server_to_come_back(
    proxied: FlakyProxy, mlflow_server: MlflowServer, tmp_path: Path  # noqa: F811
) -> None:
    tracker, run_id = _tracker(proxied, tmp_path)
    buffer = MetricsBuffer(tracker, run_id, retry_every_s=0.5)
    proxied.cut(outage_s=2.0)
    buffer.add([_row(1), _row(2), _row(3)])
    assert buffer.close(timeout_s=60) == []
    assert _steps(mlflow_server.uri, run_id) == [1, 2, 3]


def test_close_gives_up_after_the_timeout_and_returns_what_was_not_sent(proxied: FlakyProxy, tmp_path: Path) -> None:
    tracker, run_id = _tracker(proxied, tmp_path)
    buffer = MetricsBuffer(tracker, run_id, retry_every_s=0.5)
    buffer.add([_row(1)])
    proxied.cut()
    buffer.add([_row(2), _row(3)])
    started = time.monotonic()
    unsent = buffer.close(timeout_s=2)
    assert 1.0 <= time.monotonic() - started < 15
    assert [r["step"] for r in unsent] == [2, 3]
    assert [r["step"] for r in buffer.rows] == [1, 2, 3], "every row is kept for the record"


# ---------------------------------------------------------------- a stage losing the server


def _stage_runs(server_uri: str, experiment: str) -> list[Run]:
    client = MlflowClient(server_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    return client.search_runs([found.experiment_id], "tags.`duet.step` = 'stage1'",
                              order_by=["attributes.start_time ASC"])


def _wait_for(condition: Callable[[], bool], process: subprocess.Popen[bytes], what: str,
              timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert process.poll() is None, f"the run ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.mark.slow
def test_a_stage_outlives_a_tracking_outage_and_a_rerun_logs_every_step(
    proxied: FlakyProxy, mlflow_server: MlflowServer, tmp_path: Path  # noqa: F811
) -> None:
    ray_tmp = tempfile.mkdtemp(prefix="duet-outage-", dir="/tmp")  # Ray's socket paths must stay short
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update(RAY_TMPDIR=ray_tmp, PYTHONUNBUFFERED="1", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    work, runs, tag = tmp_path / "work", tmp_path / "work" / "runs", uuid.uuid4().hex[:8]

    def command(name: str, outage_timeout_s: float) -> list[str]:
        # One experiment per case: a finished stage with the same step hash in the experiment would be reused.
        return [*pretrain_command(work), f"--set=tracking.tracking_uri={proxied.url}",
                f"--set=tracking.experiment=outage-{tag}-{name}", f"--set=run.name={name}",
                f"--set=tracking.outage_timeout_s={outage_timeout_s}"]

    def has_metrics(name: str) -> bool:
        found = _stage_runs(mlflow_server.uri, f"outage-{tag}-{name}")
        return bool(found) and "loss" in found[-1].data.metrics

    try:
        # 1. The server goes away after the first metrics and is back while the stage waits at its end.
        with open(tmp_path / "back.log", "wb") as log:
            run = subprocess.Popen(command("back", 300), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
            _wait_for(lambda: has_metrics("back"), run, "the first metrics")
            proxied.cut()
            _wait_for(lambda: last_checkpoint_step(runs, "back-stage1") == STEPS, run, "the last checkpoint")
            time.sleep(3)  # training is over: the stage now waits for the server with its metrics buffered
            proxied.resume()
            assert run.wait(timeout=300) == 0, (tmp_path / "back.log").read_text()[-3000:]
        (back,) = _stage_runs(mlflow_server.uri, f"outage-{tag}-back")
        assert back.info.status == "FINISHED"
        assert _steps(mlflow_server.uri, back.info.run_id) == list(range(1, STEPS + 1)), "every step, once"
        assert "buffering them and retrying" in (tmp_path / "back.log").read_text()

        # 2. The server stays away past tracking.outage_timeout_s: a clear failure, nothing lost.
        with open(tmp_path / "gone.log", "wb") as log:
            run = subprocess.Popen(command("gone", 2), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
            _wait_for(lambda: has_metrics("gone"), run, "the first metrics")
            proxied.cut()
            status = run.wait(timeout=300)
        out = (tmp_path / "gone.log").read_text()
        assert status == 1, out[-3000:]
        (message,) = re.findall(r"\[duet\] error: (.*)", out)
        assert f"MLflow tracking store {proxied.url} stopped answering during stage1" in message, message
        (kept,) = re.findall(r"kept in (\S+?\.json)", message)
        assert Path(kept).is_file()
        assert last_checkpoint_step(runs, "gone-stage1") == STEPS, "the checkpoints were written"
        assert (runs / "gone/stage1/artifact/artifact.json").is_file(), "and the artifact"
        (interrupted,) = _stage_runs(mlflow_server.uri, f"outage-{tag}-gone")
        assert json.loads(Path(kept).read_text())["run_id"] == interrupted.info.run_id

        # 3. The server is back: the re-run trains no step again and logs what was kept.
        proxied.resume()
        rerun = subprocess.run(command("gone", 2), cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, timeout=400, check=False)
        out = rerun.stdout.decode(errors="replace")
        (tmp_path / "rerun.log").write_text(out)
        assert rerun.returncode == 0, out[-3000:]
    finally:
        end_leftovers(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)

    assert re.search(rf"resumed from checkpoint at step {STEPS}\b", out), "resumed at the end"
    assert not re.search(r"stage1 step \d+/", out), "no step trained again"
    assert re.search(r"logging \d+ steps of metrics kept during a tracking outage", out)
    resumed = _stage_runs(mlflow_server.uri, f"outage-{tag}-gone")[-1]
    assert resumed.info.status == "FINISHED" and resumed.info.run_id != interrupted.info.run_id
    assert resumed.data.tags["duet.continues_run"] == interrupted.info.run_id
    assert _steps(mlflow_server.uri, resumed.info.run_id) == list(range(1, STEPS + 1)), "the whole curve"
    assert not Path(kept).exists(), "the kept metrics are removed once logged"


# ---------------------------------------------------------------- a sweep losing the server


@dataclass
class _Trial:
    """The part of a ray.tune Trial that the ledger reads."""

    trial_id: str
    config: dict[str, float]

    def get_error(self) -> None:
        return None


def test_a_sweep_ledger_never_waits_on_a_lost_server_and_catches_up(
    proxied: FlakyProxy, mlflow_server: MlflowServer, tmp_path: Path  # noqa: F811
) -> None:
    from components.config import load_config
    from components.train.stage import StageData
    from components.tune.ledger import TrialLedger

    tracker, _ = _tracker(proxied, tmp_path)
    cfg = load_config(REPO / "pipelines/configs/demo.yaml", [f"run.work_dir={tmp_path}", "tracking.outage_timeout_s=60"])
    data = StageData(train_uri=str(tmp_path / "train"), num_train_samples=64, digest="d" * 64,
                     processor_dir=str(tmp_path), num_visual_tokens=64)
    trial = _Trial("t_00000", {"r": 8, "alpha_over_r": 2.0, "adapter_lr": 1e-4, "lr": 1e-5})
    with tracker.parent_run("sweep") as parent:
        ledger = TrialLedger(cfg, data, str(tmp_path / "sweep"), steps=4, experiment="x",
                             stage1_artifact=str(tmp_path / "stage1"), tracker=tracker, parent_run_id=parent)
        ledger.on_trial_start(0, [], trial)
        ledger.on_trial_result(0, [], trial, {"step": 1, "loss": 1.0, "val_loss": 2.0, "val_measured": 1.0})
        proxied.cut()
        started = time.monotonic()
        for step in (2, 3, 4):
            ledger.on_trial_result(0, [], trial, {"step": step, "loss": 1.0 / step, "val_loss": 2.0 - step / 10,
                                                  "val_measured": float(step == 4)})
        ledger.on_trial_complete(0, [], trial)
        assert time.monotonic() - started < 2, "Tune's hooks only queue: the sweep never waits on the store"
        time.sleep(3)  # the ledger retries while the server is away
        proxied.resume()
        ledger.close()  # waits for what is queued

    client = MlflowClient(mlflow_server.uri)
    (run,) = client.search_runs([tracker.experiment_id], "tags.`duet.kind` = 'trial'")
    assert run.info.status == "FINISHED" and run.data.tags["duet.trial_id"] == "t_00000"
    assert _steps(mlflow_server.uri, run.info.run_id) == [1, 2, 3, 4]
    assert _steps(mlflow_server.uri, run.info.run_id, "val_loss") == [1, 4], "logged where it was measured"
    assert run.data.params["adapter.r"] == "8"
