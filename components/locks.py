"""Who is running what: one process per run name, one builder per shared dataset or base-model path.

A lock is an OS file lock (`flock`) on a small file that records its holder (host, pid, start time).
The kernel releases it when the holder exits in any way, so a holder that was killed never blocks the
next run: that run finds the dead holder's record, says it takes the lock over, and goes on. A live
holder makes a second run of the same name stop at start, naming the holder (or wait, with
`run.wait_for_lock_s`); a second builder of a shared path waits for the first and then reuses what it
built. Run locks live with the checkpoints when those are on a local filesystem (every process that
could write them sees the lock) and under `run.work_dir/locks` otherwise (object storage has no
file locks: runs that share a bucket are kept apart only when they share the work dir too).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from components import storage
from components.config import DuetConfig
from components.console import say
from components.errors import DuetError
from components.layout import storage_root

POLL_S = 1.0
BUILD_WAIT_S = 3600.0  # how long a second builder of a shared path waits for the first one


class LockHeldError(DuetError):
    """Another live process holds the run name (or a shared path) this process needs."""


@dataclass(frozen=True)
class Holder:
    """What a lock file records about the process that holds it."""

    what: str
    host: str
    pid: int
    started: str  # UTC, ISO 8601

    @staticmethod
    def me(what: str) -> Holder:
        return Holder(what, socket.gethostname(), os.getpid(),
                      datetime.now(UTC).isoformat(timespec="seconds"))

    def describe(self) -> str:
        return f"host {self.host}, pid {self.pid}, started {self.started}"


def _read_holder(handle) -> Holder | None:
    handle.seek(0)
    try:
        return Holder(**json.loads(handle.read()))
    except (ValueError, TypeError):
        return None  # empty (released cleanly) or not ours


@contextmanager
def exclusive(path: Path, label: str, holder_what: str, wait_s: float,
              on_wait: Callable[[Holder | None], None], refusal: Callable[[Holder | None], str]) -> Iterator[None]:
    """Hold the lock at `path` (`label` in messages) for the block, recorded as held by `holder_what`; wait up
    to `wait_s` for a live holder, then refuse. `on_wait` is told once when this process starts waiting,
    `refusal` words the error."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        deadline, told = time.monotonic() + wait_s, False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = _read_holder(handle)
                if time.monotonic() >= deadline:
                    raise LockHeldError(f"{refusal(holder)} (lock file {path})") from None
                if not told:
                    on_wait(holder)
                    told = True
                time.sleep(POLL_S)
        left = _read_holder(handle)
        if left is not None:  # its holder ended without releasing: killed, or its machine went down
            say(f"{label}: taking over the lock left by {left.what} ({left.describe()}), which is no longer running")
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(asdict(Holder.me(holder_what))))
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()  # released cleanly: an empty file
            handle.flush()
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_lock_file(cfg: DuetConfig) -> Path:
    """`{storage root}/.locks/{run.name}.lock` for local storage, else under run.work_dir/locks."""
    root = storage_root(cfg)
    folder = Path(cfg.run.work_dir) / "locks" if storage.is_remote(root) else Path(storage.resolve(root)[1]) / ".locks"
    return folder / f"{cfg.run.name}.lock"


def build_lock_file(cfg: DuetConfig, uri: str) -> Path:
    """`.{name}.build.lock` beside a local path, else under run.work_dir/locks, named after the URI."""
    if not storage.is_remote(uri):
        local = Path(storage.resolve(uri)[1])
        return local.parent / f".{local.name}.build.lock"
    return Path(cfg.run.work_dir) / "locks" / f"build-{hashlib.sha256(uri.encode()).hexdigest()[:16]}.lock"


@contextmanager
def run_lock(cfg: DuetConfig) -> Iterator[None]:
    """One process per `run.name` over the same checkpoints: a second one refuses (or waits)."""
    name = cfg.run.name
    path = run_lock_file(cfg)

    def refusal(holder: Holder | None) -> str:
        who = holder.describe() if holder else "another process"
        return (f"run '{name}' is already running ({who}); wait for it to end, give this run another run.name, "
                f"or set run.wait_for_lock_s to wait for it")

    def on_wait(holder: Holder | None) -> None:
        say(f"run '{name}' is running ({holder.describe() if holder else 'another process'}); "
            f"waiting up to {cfg.run.wait_for_lock_s:g} s for it to end")

    with exclusive(path, f"run '{name}'", f"run '{name}'", cfg.run.wait_for_lock_s, on_wait, refusal):
        yield


@contextmanager
def build_lock(cfg: DuetConfig, uri: str) -> Iterator[None]:
    """One builder of a shared dataset or base-model path: others wait for it, then reuse what it built."""

    def who(holder: Holder | None) -> str:
        return f"{holder.what} ({holder.describe()})" if holder else "another run"

    def on_wait(holder: Holder | None) -> None:
        say(f"{uri} is being written by {who(holder)}; waiting for it, then reusing it")

    def refusal(holder: Holder | None) -> str:
        return f"{uri} is still being written by {who(holder)} after {BUILD_WAIT_S:g} s"

    with exclusive(build_lock_file(cfg, uri), uri, f"run '{cfg.run.name}'", BUILD_WAIT_S, on_wait, refusal):
        yield

