"""A worker node lost, then one preempted, mid-stage on a real multi-node Ray cluster on 127.0.0.1.

A head (`ray start --head`: the driver and data preprocessing, no room for training, since the
training worker needs the `trainer` resource, `scaling.resources_per_worker`) and worker nodes with
that resource, each a process of its own with its raylet and object store (tests/reliability/
local_cluster.py says why they are not `ray start` processes: on 127.0.0.1 `ray start` will not join).
Mid-stage the node running the training worker is killed outright, a lost machine; two new ones join
and Ray Train restarts the worker group from the last checkpoint (`scaling.max_failures: 1`, all of it
used). Then the node now running it gets a spot-reclaim notice (`ray drain-node --reason
DRAIN_NODE_REASON_PREEMPTION`, what a spot-interruption handler calls) and is killed at its deadline;
training resumes on the other one. The preemption counts apart (`scaling.max_preemption_failures`), so
it does not fail the run whose failure budget is spent. After each resume every step runs once, from
the checkpoint on, and none is lost.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from local_cluster import LocalCluster, WorkerNode
from pipeline_runs import REPO, last_checkpoint_step, pretrain_command

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
TRAINER = {"trainer": 1}
STEPS = 16  # room for a loss and a preemption, each after a checkpoint


def _wait(what: str, until, run: subprocess.Popen, log: Path, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while not until():
        assert run.poll() is None, f"the run ended while waiting for {what}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} after {timeout_s:g} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)


def _hosts_the_trainer(node: WorkerNode) -> bool:
    """Whether the training worker runs on `node` (a child of its raylet, itself a child of the node's process)."""
    try:
        return any("RayTrainWorker" in " ".join(p.cmdline()) for p in psutil.Process(node.process.pid).children(True))
    except psutil.NoSuchProcess:
        return False


def test_a_lost_node_and_a_preempted_node_resume_from_the_last_checkpoint(tmp_path: Path) -> None:
    work, log = tmp_path / "work", tmp_path / "run.log"
    runs = work / "runs"
    command = [*pretrain_command(work), f"--set=stage1.max_steps={STEPS}", "--set=scaling.max_failures=1",
               "--set=scaling.resources_per_worker={trainer: 1}"]
    cluster = None
    try:
        cluster = LocalCluster(head_cpus=2)
        first = cluster.add_node(cpus=1, resources=TRAINER)
        with open(log, "wb") as out:
            run = subprocess.Popen(command, cwd=REPO, env={**cluster.env, "RAY_ADDRESS": cluster.address},
                                   stdout=out, stderr=subprocess.STDOUT)

        def resumed() -> list[int]:
            return [int(s) for s in re.findall(r"resumed from checkpoint at step (\d+)", log.read_text())]

        _wait("first checkpoint", lambda: last_checkpoint_step(runs) >= 2 and _hosts_the_trainer(first), run, log)
        lost_at = last_checkpoint_step(runs)
        cluster.kill(first)  # the machine is gone, without notice
        spares = [cluster.add_node(cpus=1, resources=TRAINER) for _ in range(2)]  # what an autoscaler launches
        _wait("resume on a new node", lambda: len(resumed()) == 1, run, log)
        _wait("a checkpoint after the resume", lambda: last_checkpoint_step(runs) > resumed()[0]
              and any(map(_hosts_the_trainer, spares)), run, log)
        (reclaimed,) = [node for node in spares if _hosts_the_trainer(node)]
        preempted_at = last_checkpoint_step(runs)
        cluster.drain_for_preemption(reclaimed, deadline_s=2)  # the spot reclaim notice
        time.sleep(3)
        cluster.kill(reclaimed)  # and the cloud takes the node back at its deadline
        _wait("resume after the preemption", lambda: len(resumed()) == 2, run, log)
        rc = run.wait(timeout=300)
        output = log.read_text()
        assert rc == 0, output[-4000:]
    finally:
        if cluster is not None:
            cluster.stop()

    first_resume, second_resume = resumed()
    assert first_resume >= lost_at >= 2 and second_resume >= preempted_at > first_resume, (resumed(), output)
    # The progress lines (one per step) in stretches: from step 1, then from each resume on.
    stretches: list[list[int]] = [[]]
    for resume, step in re.findall(rf"resumed from checkpoint at step (\d+)|stage1 step (\d+)/{STEPS} ", output):
        if resume:
            stretches.append([int(resume)])  # the checkpoint it starts from
        else:
            stretches[-1].append(int(step))
    assert [s[0] for s in stretches] == [1, first_resume, second_resume], stretches
    assert all(s == list(range(s[0], s[0] + len(s))) for s in stretches), f"a step lost or repeated: {stretches}"
    assert stretches[-1][-1] == STEPS, "trained to the end"
    assert (work / "runs/demo/stage1/artifact/artifact.json").is_file()
