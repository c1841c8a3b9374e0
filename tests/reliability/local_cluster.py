"""A multi-node Ray cluster on 127.0.0.1, for node-loss tests (test helper).

The head is `ray start --head --block`; each worker node is a process of its own
(tests/reliability/ray_worker_node.py: `ray start --block` for a worker, kept on 127.0.0.1) in a session
of its own, so killing its process group ends that node only (its raylet, object store and the workers
on it), as losing a machine does. Ray's cluster mode stays off (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0), so
every server of every node binds 127.0.0.1; token auth is on; the cluster's files live under a short temp
dir of its own (Ray's socket paths must stay under 108 bytes). `stop()` ends this cluster only.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ports import free_port
from probe_output import PROBE_MARK, probe_json

RAY = str(Path(sys.executable).parent / "ray")
WORKER_NODE = str(Path(__file__).with_name("ray_worker_node.py"))
FAKE_HEAD_NODE_ID = "f" * 51 + "00000"  # the id the fake multi-node provider knows the head by


@dataclass
class WorkerNode:
    process: subprocess.Popen
    node_id: str


class LocalCluster:
    """A head with `head_cpus` CPUs (no custom resources) and worker nodes added and killed one by one,
    or, given `autoscaling_config` (a cluster file's dict), nodes that Ray's autoscaler launches and removes."""

    def __init__(self, head_cpus: float = 2, autoscaling_config: dict | None = None) -> None:
        self.tmp = tempfile.mkdtemp(prefix="duet-nodes-", dir="/tmp")
        home = Path(self.tmp) / "home"
        home.mkdir()
        self.env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTEST_CURRENT_TEST")}
        # DeepSpeed's compiled ops stay where this user's earlier runs built them (they live under HOME).
        self.env.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/torch_extensions"))
        self.env.update(HOME=str(home), RAY_TMPDIR=self.tmp, RAY_AUTH_MODE="token", PYTHONUNBUFFERED="1",
                        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
                        # A lost node is declared dead after about 3 s instead of Ray's default 30 s or so.
                        RAY_health_check_period_ms="1000", RAY_health_check_failure_threshold="3",
                        RAY_health_check_timeout_ms="1000")
        subprocess.run([RAY, "get-auth-token", "--generate"], env=self.env, check=True, capture_output=True)
        self.address = f"127.0.0.1:{free_port()}"
        self._processes: list[subprocess.Popen] = []
        head_env = {}
        extra = []
        if autoscaling_config is not None:
            # Ray's fake multi-node provider: the autoscaler launches and removes nodes as processes on
            # this machine (on 127.0.0.1, since cluster mode is off), deciding as it would on a cloud.
            config = {**autoscaling_config, "provider": {**autoscaling_config["provider"], "gcs_address": self.address}}
            path = Path(self.tmp) / "autoscaling.json"
            path.write_text(json.dumps(config))
            extra = [f"--autoscaling-config={path}"]
            head_env = {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
                        "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID}
        self.head = self._spawn("head", [
            RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--disable-usage-stats",
            "--port", self.address.rsplit(":", 1)[1], "--num-cpus", str(head_cpus), "--include-dashboard", "false",
            "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
            "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port()),
            "--ray-client-server-port", str(free_port()), *extra], head_env)
        self._wait("the Ray head to come up", lambda: len(self.alive_ids()) > 0, timeout_s=240)

    def _spawn(self, name: str, command: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(Path(self.tmp) / f"{name}.log", "wb")  # noqa: SIM115 (lives as long as the node)
        process = subprocess.Popen(command, env={**self.env, **(env or {})}, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        self._processes.append(process)
        return process

    def alive_ids(self) -> set[str]:
        """The ids of the nodes Ray counts as alive, asked from a fresh driver."""
        probe = ("import json, ray; ray.init(address='auto', logging_level='ERROR', log_to_driver=False); "
                 f"print({PROBE_MARK!r} + json.dumps([n['NodeID'] for n in ray.nodes() if n['Alive']]))")
        try:
            done = subprocess.run([sys.executable, "-c", probe], env={**self.env, "RAY_ADDRESS": self.address},
                                  capture_output=True, text=True, timeout=60, check=False)
        except subprocess.TimeoutExpired:  # a GCS still starting on a loaded machine: ask again, within the wait
            return set()
        return set(probe_json(done.stdout)) if done.returncode == 0 else set()

    def _wait(self, what: str, until, timeout_s: float = 90) -> None:
        deadline = time.monotonic() + timeout_s
        while not until():
            assert time.monotonic() < deadline, f"{what}: not after {timeout_s:g} s"
            assert self.head.poll() is None, f"the Ray head exited:\n{(Path(self.tmp) / 'head.log').read_text()}"
            time.sleep(1)

    def add_node(self, cpus: float, resources: dict[str, float]) -> WorkerNode:
        """A worker node joining the cluster; returns once Ray counts it alive."""
        name = f"node-{len(self._processes)}"
        process = self._spawn(name, [sys.executable, WORKER_NODE, "--address", self.address,
                                     "--num-cpus", str(cpus), "--resources", json.dumps(resources)])
        log = Path(self.tmp) / f"{name}.log"

        def started() -> str | None:
            assert process.poll() is None, f"the worker node exited:\n{log.read_text()[-2000:]}"
            found = re.search(r"node_id=([0-9a-f]+)", log.read_text())
            return found.group(1) if found else None

        self._wait("worker node start", started)
        node = WorkerNode(process, started())
        self._wait("worker node registered", lambda: node.node_id in self.alive_ids())
        return node

    def kill(self, node: WorkerNode) -> None:
        """The node's machine is gone: its raylet and every process on it end at once; returns once Ray knows."""
        os.killpg(node.process.pid, signal.SIGKILL)
        node.process.wait(timeout=30)
        self._wait("lost node declared dead", lambda: bool(alive := self.alive_ids()) and node.node_id not in alive)

    def drain_for_preemption(self, node: WorkerNode, deadline_s: int) -> None:
        """What a cloud provider's spot reclaim notice does: the node is drained, to be killed at the deadline."""
        subprocess.run([RAY, "drain-node", "--address", self.address, "--node-id", node.node_id,
                        "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot instance reclaimed",
                        "--deadline-remaining-seconds", str(deadline_s)],
                       env=self.env, check=True, capture_output=True, timeout=60)

    def launched_raylets(self) -> dict[str, int]:
        """Node id -> raylet pid of the nodes the fake autoscaler launched (not the head)."""
        import psutil

        found = {}
        for proc in psutil.process_iter(["pid", "name", "cmdline"]):
            try:
                cmdline = proc.info["cmdline"] or []
                if proc.info["name"] != "raylet" or proc.environ().get("RAY_TMPDIR") != self.tmp:
                    continue
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            ids = [a.split("=", 1)[1] for a in cmdline if a.startswith("--node_id=")]
            if ids and ids[0] != FAKE_HEAD_NODE_ID:
                found[ids[0]] = proc.pid
        return found

    def stop(self) -> None:
        """End the worker nodes, then the head (each stops what it started), and remove the temp dir."""
        for process in [p for p in self._processes if p is not self.head] + [self.head]:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
        self._end_leftovers()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _end_leftovers(self) -> None:
        """Processes of this cluster still running after the head stopped (the fake nodes' own), by pid."""
        import psutil

        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                if proc.pid != os.getpid() and proc.environ().get("RAY_TMPDIR") == self.tmp:
                    proc.kill()
