"""A stage on an autoscaling cluster: it waits for the autoscaler's nodes, trains, and the idle nodes go.

Ray's autoscaler runs on the head with the fake multi-node provider (`RAY_FAKE_CLUSTER=1`, the one
behind `ray.cluster_utils.AutoscalingCluster`), which launches and removes worker nodes as local
processes on 127.0.0.1, deciding as it would on a cloud. The layout is the shipped cluster files'
(clusters/aws, clusters/gcp): a head with no CPUs for training or data, one worker node type from 0 to
2 nodes. A submitted stage is not refused by the up-front resource check (the cluster can grow to what
it needs; this autoscaler, Ray's v1, does not publish its limits, so the run says it waits for it),
waits while the autoscaler launches a node, and trains; once the stage is done the idle node is removed
(`idle_timeout_minutes`): nothing of the run stays on it (Ray Data's detached bookkeeping actors, which
would, are created on the head by the driver). A node lost mid-stage is tests/reliability/test_node_loss.py: this provider
cannot stand for it, since it keeps counting a node whose processes were killed as running (a cloud
reports the instance gone), so its autoscaler never replaces it; Ray's v2 autoscaler, which would,
does not start from the installed wheel with this provider (it lacks the provider's defaults file).
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest
from local_cluster import LocalCluster
from pipeline_runs import REPO, STEPS, pretrain_command

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

# clusters/aws/gpu-autoscaling.yaml, scaled to this machine: the head runs no work, a worker node type
# scales from 0 to 2, idle nodes go after 6 s. The keys the fake provider needs besides are its own.
AUTOSCALING = {
    "cluster_name": "duet-autoscaling-test",
    "max_workers": 2,
    "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                 "disable_launch_config_check": True},
    "available_node_types": {
        "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
        "cpu": {"resources": {"CPU": 2}, "node_config": {}, "min_workers": 0, "max_workers": 2},
    },
    "head_node_type": "ray.head.default",
    "upscaling_speed": 1.0,
    "idle_timeout_minutes": 0.1,
    "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
    "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
    "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
    "worker_start_ray_commands": [],
}


def _wait(what: str, until, run: subprocess.Popen | None, log: Path, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while not until():
        assert run is None or run.poll() is None, f"the run ended while waiting for {what}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} after {timeout_s:g} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)


def test_a_stage_waits_for_the_autoscaler_trains_and_the_idle_node_goes(tmp_path: Path) -> None:
    work, log = tmp_path / "work", tmp_path / "run.log"
    cluster = None
    launched: set[str] = set()
    try:
        cluster = LocalCluster(head_cpus=0, autoscaling_config=AUTOSCALING)
        assert len(cluster.alive_ids()) == 1, "the head alone: nothing launched before work arrives"
        with open(log, "wb") as out:
            run = subprocess.Popen(pretrain_command(work), cwd=REPO, env={**cluster.env, "RAY_ADDRESS": cluster.address},
                                   stdout=out, stderr=subprocess.STDOUT)
        _wait("a launched node", lambda: launched.update(cluster.launched_raylets()) or launched, run, log)
        rc = run.wait(timeout=400)
        output = log.read_text()
        assert rc == 0, output[-4000:]
        _wait("idle nodes removed", lambda: not cluster.launched_raylets() and len(cluster.alive_ids()) == 1,
              None, log, timeout_s=120)
    finally:
        if cluster is not None:
            cluster.stop()

    assert re.search(r"\[duet\] Ray: joined the cluster at 127\.0\.0\.1:\d+ \(no CPUs\)", output), output[:2000]
    assert re.search(r"\[duet\] stage 1 needs 1\.25 CPU; stage 2 needs [\d.]+ CPU; evaluation needs [\d.]+ CPU at once, "
                     r"more than the cluster has now \(no CPUs\): each waits for the autoscaler", output), output[:2000]
    steps = [int(s) for s in re.findall(rf"stage1 step (\d+)/{STEPS} ", output)]
    assert steps == list(range(1, STEPS + 1)), steps
    assert (work / "runs/demo/stage1/artifact/artifact.json").is_file()
