"""Faults that need no GPU cluster: the S3 path going away for a while or for good, the tracking server
down at start, the driver killed mid-stage.

The S3 faults use this module's own S3 endpoint (moto's threaded server on a free port, not the shared
fixture) behind a TCP proxy on 127.0.0.1 that drops every connection after a chosen number of bytes and
refuses new ones for a while or for good: the storage keeps its objects, only the network path fails.
A worker killed mid-stage is covered by tests/test_train_stages.py
(test_killed_worker_resumes_without_lost_or_repeated_steps).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
from conftest import FAKE_AWS_ENV, free_port
from flaky_proxy import FlakyProxy
from moto.server import ThreadedMotoServer
from pipeline_runs import checkpoints, end_leftovers, pretrain_command

from components import storage
from components.config import DuetConfig, StorageSection, load_config
from components.storage import StorageError
from components.tracking.tracker import TrackingUnreachable
from components.workflow.full import run_full
from components.workflow.tracked_stage import run_single_stage

REPO = Path(__file__).resolve().parents[2]
# Long enough that the stage is still training after a rival driver was refused (a step takes ~0.3 s).
KILLED_DRIVER_STEPS = 40
MiB = 2**20
pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def proxy(monkeypatch: pytest.MonkeyPatch) -> Iterator[FlakyProxy]:
    """This test's own S3 endpoint behind a FlakyProxy; fake credentials in the environment."""
    for name, value in FAKE_AWS_ENV.items():
        monkeypatch.setenv(name, value)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    flaky = FlakyProxy(free_port(), port)
    flaky.start()
    try:
        yield flaky
    finally:
        flaky.stop()
        server.stop()


def _storage(proxy: FlakyProxy, password: str = "") -> StorageSection:
    userinfo = f"minio:{password}@" if password else ""
    return StorageSection(endpoint_url=f"http://{userinfo}127.0.0.1:{proxy.port}", region="us-east-1", retries=3,
                         connect_timeout_s=1, request_timeout_s=5)


def _bucket(cfg: StorageSection) -> str:
    uri = f"s3://faults-{uuid.uuid4().hex[:10]}"
    storage.ensure_bucket(uri, cfg)
    return uri


def test_a_read_survives_the_endpoint_dropping_out_mid_transfer(proxy: FlakyProxy) -> None:
    cfg = _storage(proxy)
    uri = storage.join(_bucket(cfg), "shards/shard-00000.tar")
    payload = os.urandom(8 * MiB)
    storage.write_bytes(uri, payload, cfg)

    # 2 MiB into the download every connection drops and the port refuses connections for 2 s.
    proxy.cut_after_bytes, proxy.outage_s = proxy.bytes_to_clients + 2 * MiB, 2.0
    connections, started = proxy.connections, time.monotonic()
    data = storage.read_bytes(uri, cfg)
    elapsed = time.monotonic() - started

    assert proxy.cuts == 1, "the fault fired"
    assert hashlib.sha256(data).digest() == hashlib.sha256(payload).digest(), "complete and intact, not truncated"
    assert proxy.connections - connections >= 2, "the read reconnected after the outage"
    assert 2.0 <= elapsed < 60, elapsed


def test_an_endpoint_gone_for_good_fails_clearly_and_leaves_local_files_whole(
    proxy: FlakyProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "pw-" + uuid.uuid4().hex[:12]
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "sk-" + uuid.uuid4().hex)
    cfg = _storage(proxy, password=secret)
    prefix = storage.join(_bucket(cfg), "artifact")
    names = [f"part-{i}.bin" for i in range(4)]
    old = {name: os.urandom(MiB) for name in names}
    for name, data in old.items():
        storage.write_bytes(storage.join(prefix, name), data, cfg)
    local = tmp_path / "artifact"
    storage.download_dir(prefix, local, cfg)  # the earlier, complete local copy
    new = {name: os.urandom(MiB) for name in names}
    for name, data in new.items():
        storage.write_bytes(storage.join(prefix, name), data, cfg)

    proxy.cut_after_bytes, proxy.outage_s = proxy.bytes_to_clients + MiB + MiB // 2, None  # mid second file
    started = time.monotonic()
    with pytest.raises(StorageError) as err:
        storage.download_dir(prefix, local, cfg)
    assert time.monotonic() - started < 60

    message = str(err.value)
    assert f"127.0.0.1:{proxy.port}" in message and "download" in message, message
    assert secret not in message and os.environ["AWS_SECRET_ACCESS_KEY"] not in message
    files = sorted(p.name for p in local.iterdir())
    assert files == names, f"no partial or temporary files left: {files}"
    for name in names:
        assert (local / name).read_bytes() in (old[name], new[name]), f"{name} is neither version: torn write"
    assert (local / names[-1]).read_bytes() == old[names[-1]], "files not reached yet are untouched"


def test_an_endpoint_down_from_the_start_names_it_without_the_password(proxy: FlakyProxy) -> None:
    cfg = _storage(proxy, password="hunter2-" + uuid.uuid4().hex[:6])
    proxy.stop()
    started = time.monotonic()
    with pytest.raises(StorageError) as err:
        storage.read_bytes("s3://bucket/x", cfg)
    assert time.monotonic() - started < 30
    assert f"http://127.0.0.1:{proxy.port}" in str(err.value) and "hunter2" not in str(err.value)


# ---------------------------------------------------------------- tracking down at start


def _demo_config(work: Path, *overrides: str) -> DuetConfig:
    return load_config(REPO / "pipelines/configs/demo.yaml", [
        f"run.work_dir={work}", f"data.root={work}/datasets", f"model.checkpoint={work}/base",
        f"scaling.storage_path={work}/runs", *overrides,
    ])


@pytest.mark.parametrize("entry", ["full", "pretrain"])
def test_tracking_server_down_at_start_stops_before_any_work(tmp_path: Path, entry: str) -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    cfg = _demo_config(tmp_path / "work", f"tracking.tracking_uri={uri}")
    was_running = ray.is_initialized()
    started = time.monotonic()
    try:
        with pytest.raises(TrackingUnreachable) as err:
            run_full(cfg) if entry == "full" else run_single_stage(cfg, stage=1)
        started_ray = not was_running and ray.is_initialized()
    finally:
        if not was_running and ray.is_initialized():
            ray.shutdown()
    assert time.monotonic() - started < 20, "fails fast"
    assert uri in str(err.value) and "tracking.tracking_uri" in str(err.value)
    assert not started_ray, "no Ray cluster was started for nothing"
    written = sorted(str(p.relative_to(tmp_path / "work")) for p in (tmp_path / "work").rglob("*") if p.is_file())
    # Only the run's lock (taken first, released on the way out) exists: no data, base or run state.
    assert written == ["runs/.locks/demo.lock"], f"work was done before the check: {written}"


# ---------------------------------------------------------------- the driver killed mid-stage


@pytest.mark.slow
def test_a_killed_driver_reruns_from_the_last_checkpoint_reusing_the_data(tmp_path: Path) -> None:
    # Ray's socket paths must stay under 108 bytes: a short temp dir of our own, not pytest's.
    ray_tmp = tempfile.mkdtemp(prefix="duet-kill-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=ray_tmp, PYTHONUNBUFFERED="1", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    work = tmp_path / "work"
    command = [*pretrain_command(work), f"--set=stage1.max_steps={KILLED_DRIVER_STEPS}"]
    try:
        with open(tmp_path / "first.log", "wb") as log:
            first = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
            deadline = time.monotonic() + 240
            while checkpoints(work / "runs") == 0 and first.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            assert first.poll() is None, "the first run ended before its first checkpoint"
            # A second driver on the same run while the first one trains: refused at start, naming the holder.
            rival = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
            assert first.poll() is None, "the first run ended while the second one was refused"
            os.killpg(first.pid, signal.SIGKILL)  # the driver and what shares its session, no clean-up
            first.wait(timeout=30)
        end_leftovers(ray_tmp)
        assert rival.returncode == 1, rival.stdout + rival.stderr
        assert f"[duet] error: run 'demo' is already running (host {socket.gethostname()}, pid {first.pid}, " \
               "started " in rival.stderr, rival.stderr
        assert rival.stdout == "", "refused before anything was planned or written"
        killed_at = checkpoints(work / "runs")
        assert not (work / "runs/demo/stage1/artifact/artifact.json").exists(), "killed mid-stage"

        second = subprocess.run(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                timeout=300, check=False)
        out = second.stdout.decode(errors="replace")
        (tmp_path / "second.log").write_text(out)
        assert second.returncode == 0, out[-3000:]
    finally:
        end_leftovers(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)

    assert re.search(rf"\[duet\] run 'demo': taking over the lock left by run 'demo' \(host \S+, pid {first.pid}, "
                     r"started [^)]+\), which is no longer running", out), out[:3000]
    reused = re.findall(r"\[duet\] data (\w+): \d+ records, digest \w+ \((\w+)\)", out)
    assert sorted(reused) == [(s, "reused") for s in ("caption", "test", "train", "validation")], reused
    assert re.search(r"\[duet\] base model: .* \(reused\)", out)
    (resumed,) = map(int, re.findall(r"resumed from checkpoint at step (\d+)", out))
    steps = [int(s) for s in re.findall(rf"stage1 step (\d+)/{KILLED_DRIVER_STEPS} ", out)]
    assert resumed >= 2 and resumed % 2 == 0 and killed_at >= 1
    assert steps == list(range(resumed + 1, KILLED_DRIVER_STEPS + 1)), f"resumed at {resumed}, then ran {steps}"
    assert (work / "runs/demo/stage1/artifact/artifact.json").is_file()
