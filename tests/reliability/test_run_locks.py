"""Two runs of the same name at once, a holder that died, and two runs building one shared base model.

The holders are real processes (a lock is released by the kernel when its process ends, however it
ends). Two `pipelines/pretrain.py` started on the same run, one of them then killed, is
tests/reliability/test_faults.py (test_a_killed_driver_reruns_from_the_last_checkpoint_reusing_the_data).
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
from contextlib import contextmanager
from pathlib import Path

import pytest

from components.config import DuetConfig, load_config
from components.locks import LockHeldError, build_lock_file, run_lock, run_lock_file

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(240)

_HOLD = """
import sys, time
from components.config import load_config
from components.locks import run_lock
cfg = load_config(None, sys.argv[1:]).with_absolute_paths()
with run_lock(cfg):
    print("HELD", flush=True)
    time.sleep(float(cfg.run.seed) or 600)
"""


def _config(work: Path, *overrides: str) -> DuetConfig:
    return load_config(None, [f"run.work_dir={work}", "run.name=same", *overrides]).with_absolute_paths()


def _hold(work: Path, seconds: int = 0) -> subprocess.Popen[str]:
    """A process holding the run lock of `same` for `seconds` (0: until killed)."""
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, f"run.work_dir={work}", "run.name=same",
                               f"run.seed={seconds}"], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "HELD"
    return holder


@contextmanager
def _held(work: Path) -> Iterator[subprocess.Popen[str]]:
    """A holder process for the length of a `with` block."""
    holder = _hold(work)
    try:
        yield holder
    finally:
        holder.kill()
        holder.wait()


def test_a_second_run_of_the_same_name_refuses_naming_the_holder(tmp_path: Path) -> None:
    holder = _hold(tmp_path)
    try:
        started = time.monotonic()
        with pytest.raises(LockHeldError) as err, run_lock(_config(tmp_path)):
            pass
        assert time.monotonic() - started < 5, "refused at once"
    finally:
        holder.kill()
        holder.wait()
    message = str(err.value)
    assert f"run 'same' is already running (host {socket.gethostname()}, pid {holder.pid}, started 20" in message
    assert "run.wait_for_lock_s" in message and str(run_lock_file(_config(tmp_path))) in message, message
    with run_lock(_config(tmp_path)):  # the holder is gone
        pass


def test_a_run_asked_to_wait_starts_when_the_holder_ends(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    holder = _hold(tmp_path, seconds=3)
    started = time.monotonic()
    with run_lock(_config(tmp_path, "run.wait_for_lock_s=60")):
        waited = time.monotonic() - started
    holder.wait(timeout=30)
    assert 1 < waited < 30, waited
    assert f"run 'same' is running (host {socket.gethostname()}, pid {holder.pid}," in capfd.readouterr().out
    with pytest.raises(LockHeldError):  # a wait that runs out refuses as well
        with _held(tmp_path), run_lock(_config(tmp_path, "run.wait_for_lock_s=1.5")):
            pass


def test_a_killed_holder_leaves_a_lock_the_next_run_takes_over(tmp_path: Path,
                                                               capfd: pytest.CaptureFixture[str]) -> None:
    holder = _hold(tmp_path)
    os.kill(holder.pid, signal.SIGKILL)  # no clean-up: its record stays in the lock file
    holder.wait()
    assert f'"pid": {holder.pid}' in run_lock_file(_config(tmp_path)).read_text()
    with run_lock(_config(tmp_path)):
        pass
    out = capfd.readouterr().out
    assert re.search(rf"run 'same': taking over the lock left by run 'same' \(host \S+, pid {holder.pid}, "
                     r"started [^)]+\), which is no longer running", out), out
    assert run_lock_file(_config(tmp_path)).read_text() == "", "released cleanly: the record is cleared"


_BUILD = """
import sys
from components.config import load_config
from components.workflow.startup import ensure_base_model
cfg = load_config(None, sys.argv[1:]).with_absolute_paths()
ensure_base_model(cfg, {})
"""


def test_two_runs_sharing_a_base_model_path_build_it_once(tmp_path: Path) -> None:
    base = tmp_path / "shared-base"
    common = [f"model.checkpoint={base}", "model.tiny.warmup_steps=0", "model.tiny.vision_warmup_steps=40",
              "model.tiny.vision_warmup_batch=16"]

    def launch(name: str) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-c", _BUILD, f"run.work_dir={tmp_path / name}", f"run.name={name}",
                                 *common], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    first = launch("first")
    assert first.stdout is not None
    lines = [first.stdout.readline()]
    assert "base model: building the tiny LLaVA" in lines[0], lines
    second = launch("second")  # while the first one is still building
    out_second, _ = second.communicate(timeout=180)
    out_first = "".join(lines) + first.communicate(timeout=180)[0]
    assert first.returncode == 0 and second.returncode == 0, out_first + out_second
    assert re.search(rf"{base} is being written by run 'first' \(host \S+, pid {first.pid}, started [^)]+\); "
                     "waiting for it, then reusing it", out_second), out_second
    assert f"base model: {base} (reused)" in out_second and "building" not in out_second, out_second
    assert (base / "config.json").is_file() and build_lock_file(_config(tmp_path), str(base)).is_file()
