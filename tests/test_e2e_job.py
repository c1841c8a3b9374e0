"""End to end as users run it: `ray start --head` on 127.0.0.1, then `ray job submit -- python pipelines/full.py`.

The cluster runs with token auth on (Ray's default for `ray start --head`); the client
passes RAY_AUTH_MODE=token. The job tracks to a real `mlflow server` on 127.0.0.1.
Only the head and the server this test started are stopped.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow_server import MlflowServer, mlflow_server  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    temp = tmp_path_factory.mktemp("ray")
    dashboard = _free_port()
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(_free_port()),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--num-cpus", "4",
         # Own ports for the node's agents too: another Ray on this machine must not collide with them.
         "--dashboard-agent-listen-port", str(_free_port()), "--dashboard-agent-grpc-port", str(_free_port()),
         "--runtime-env-agent-port", str(_free_port()), "--metrics-export-port", str(_free_port()),
         "--ray-client-server-port", str(_free_port()),
         "--temp-dir", str(temp), "--disable-usage-stats"],
        env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            probe = subprocess.run([RAY, "job", "list", "--address", address], env=_env(), capture_output=True)
            if probe.returncode == 0:
                break
            assert head.poll() is None, "ray start --head exited"
            time.sleep(2)
        else:
            pytest.fail("the Ray head's job server did not come up in 120 s")
        yield address
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # --block: the head stops the processes it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)


def _submit(address: str, work: Path, tracking_uri: str) -> str:
    overrides = [
        f"run.work_dir={work}", f"data.root={work}/datasets", f"model.checkpoint={work}/base",
        f"tracking.tracking_uri={tracking_uri}", "run.name=e2e", "registry.model_name=duet-e2e",
        "data.num_records=160", "data.caption_records=80", "data.records_per_shard=40",
        "data.val_fraction=0.1", "data.test_fraction=0.1", "model.tiny.warmup_steps=0",
        "stage1.global_batch=8", "stage1.micro_batch=2", "stage1.max_steps=3", "stage1.checkpoint_every=3",
        "stage2.global_batch=8", "stage2.micro_batch=2", "stage2.max_steps=3", "stage2.checkpoint_every=3",
        "stage2.eval_batches=1", "adapter.r=8", "adapter.alpha=16",
        "eval.max_samples=8", "eval.max_new_tokens=8", "eval.batch_size=8", "eval.cpus_per_replica=0.5",
    ]
    args = [RAY, "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
            "python", "pipelines/full.py", "--config", "pipelines/configs/demo.yaml"]
    for override in overrides:
        args += ["--set", override]
    for _ in range(10):
        done = subprocess.run(args, env=_env(), capture_output=True, text=True, timeout=1500)
        output = done.stdout + done.stderr
        if "No available agent to submit job" not in output:
            break
        time.sleep(5)  # the head's job agent registers a little after its REST API answers
    assert done.returncode == 0, output[-6000:]
    assert re.search(r"Job '.*' succeeded", output), output[-3000:]
    return output


def test_full_pipeline_through_ray_job_submit(
    ray_head: str, mlflow_server: MlflowServer, tmp_path: Path  # noqa: F811
) -> None:
    first = _submit(ray_head, tmp_path, mlflow_server.uri)
    assert "promote:" in first
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    champion = client.get_model_version_by_alias("duet-e2e", "champion")
    stage2 = client.get_run(champion.run_id)
    stage1_id = stage2.data.tags["duet.parent_stage_run_id"]
    stage1 = client.get_run(stage1_id)
    assert stage1.data.tags["duet.step"] == "stage1"
    digest = stage2.data.tags["duet.dataset_digest"]
    assert champion.tags["duet.dataset_digest"] == digest
    stage1_digest = stage1.data.tags["duet.dataset_digest"]
    assert stage1_digest.startswith(stage1.inputs.dataset_inputs[0].dataset.digest)
    parent = client.get_run(stage2.data.tags["mlflow.parentRunId"])
    assert parent.data.tags["duet.kind"] == "pipeline"
    assert stage1.data.tags["mlflow.parentRunId"] == parent.info.run_id
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert {r.data.tags["duet.step"] for r in children} >= {"stage1", "stage2", "evaluate-zero-shot",
                                                          "evaluate-fine-tuned"}

    second = _submit(ray_head, tmp_path, mlflow_server.uri)
    assert re.search(r"data caption: \d+ records, digest \w+ \(reused\)", second), second[-3000:]
    assert "stage1: reused run " + stage1_id in second
