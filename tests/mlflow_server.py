"""A real `mlflow server` on 127.0.0.1 (SQLite backend, proxied local artifacts) for tracking tests.

Test modules import the ``mlflow_server`` fixture from here. The server is started
once per test session even when several modules import the fixture (the handle is
cached in this module) and stopped at the end of the session.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from ports import free_port

STARTUP_TIMEOUT_S = 90.0


@dataclass
class MlflowServer:
    """Handle on the running server: its URI, its files and its process."""

    uri: str
    root: Path
    log_file: Path
    process: subprocess.Popen[bytes]

    @property
    def artifact_dir(self) -> Path:
        return self.root / "artifacts"

    def stop(self) -> None:
        """Stop the server's process group (the server and its own workers); safe to call twice."""
        if self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=15)


_SERVER: MlflowServer | None = None


def _wait_healthy(server: MlflowServer) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"mlflow server exited early:\n{server.log_file.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{server.uri}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"mlflow server not healthy after {STARTUP_TIMEOUT_S}s:\n{server.log_file.read_text()[-3000:]}")


def start_server() -> MlflowServer:
    """Start (or reuse) the session's server and wait until /health answers."""
    global _SERVER
    if _SERVER is not None and _SERVER.process.poll() is None:
        return _SERVER
    root = Path(tempfile.mkdtemp(prefix="duet-mlflow-server-"))
    port = free_port()
    log_file = root / "server.log"
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    command = [
        str(mlflow_cli), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", (root / "artifacts").as_uri(),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no background job workers: faster start, fewer processes
    with open(log_file, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    _SERVER = MlflowServer(f"http://127.0.0.1:{port}", root, log_file, process)
    _wait_healthy(_SERVER)
    return _SERVER


@pytest.fixture(scope="session")
def mlflow_server() -> Iterator[MlflowServer]:
    """The session's MLflow server; stopped when the session ends."""
    server = start_server()
    yield server
    server.stop()
    shutil.rmtree(server.root, ignore_errors=True)
