"""The Ray instance a plain local run starts listens on 127.0.0.1 only, whatever the environment says,
and has token authentication on without Ray warning that it turned it on.

Run in a fresh process without RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER (the Makefile and CI set it; a user's
shell does not) nor RAY_AUTH_MODE: `init_ray` as every pipeline script calls it, then every listening
socket of that process and the processes it started, then a client without the token.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from probe_output import PROBE_MARK, probe_json

REPO = Path(__file__).resolve().parents[2]

_PROBE = textwrap.dedent("""
    import json, os, subprocess, sys, time
    import psutil, ray
    from components.cluster import init_ray
    from components.config import load_config

    init_ray(load_config(None, []))
    time.sleep(2)  # the agents and the first workers open their ports after ray.init returns
    me = psutil.Process()
    pids = {p.pid for p in [me, *me.children(recursive=True)]}
    listening = sorted({(c.laddr.ip, c.laddr.port) for c in psutil.net_connections(kind="inet")
                        if c.status == psutil.CONN_LISTEN and c.pid in pids})
    stranger = subprocess.run(
        [sys.executable, "-c", f"import ray; ray.init(address={ray.get_runtime_context().gcs_address!r})"],
        env={**os.environ, "RAY_AUTH_MODE": "disabled"}, capture_output=True, text=True, timeout=120)
    refused = stranger.returncode != 0 and "InvalidAuthToken" in stranger.stderr
    print(__MARK__ + json.dumps({"node": ray.util.get_node_ip_address(), "listening": listening,
                                 "tokenless_client_refused": refused}))
    ray.shutdown()
""").replace("__MARK__", repr(PROBE_MARK))

LOOPBACK = ("127.0.0.1", "::ffff:127.0.0.1", "::1")


@pytest.mark.slow
def test_a_local_run_opens_no_port_beyond_loopback() -> None:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS", "RAY_AUTH_MODE")}
    ray_tmp = tempfile.mkdtemp(prefix="duet-ray-", dir="/tmp")  # Ray's socket paths must stay short
    env.update(RAY_TMPDIR=ray_tmp, PYTHONUNBUFFERED="1")
    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=180)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = probe_json(proc.stdout)
    assert report["node"] == "127.0.0.1"
    assert report["listening"], "the probe found no listening socket at all: it looked at the wrong processes"
    exposed = [(ip, port) for ip, port in report["listening"] if ip not in LOOPBACK]
    assert not exposed, f"Ray listens beyond loopback: {exposed}"
    assert report["tokenless_client_refused"], "Ray's token auth must stay on for a local run"
    assert "Token authentication" not in proc.stderr, "duet turns token auth on itself: Ray has nothing to warn of"
