"""A workaround for Ray 2.60: stopped trials give their training workers' placement groups back.

ASHA ends a trial by ending the trial's process, which takes its Train controller and the workers
with it; their placement group, though, lives as long as the job. Ray Train's own cleaner
(`ray.train.v2._internal.execution.controller.placement_group_cleaner`) asks Ray's state API, and
a cluster whose dashboard is not running does not serve it, so stopped trials would keep their
CPUs and GPUs and later trials would wait forever. This module watches each trial's controller and
removes its group once the controller is gone; runs that shut down normally remove their group
themselves and are forgotten here.

It reaches into Ray Train's internals (`ControllerCallback`, `WorkerGroupCallback`). When can it
go: once a Ray release removes a stopped trial's worker group without the state API (check that
`tests/test_tune.py`'s sweep gets all its CPUs back with this module's callback left out), delete
this module and its two uses in components/tune/sweep.py.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError
from ray.train.v2._internal.execution.callback import ControllerCallback, WorkerGroupCallback
from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

log = logging.getLogger(__name__)

@ray.remote(num_cpus=0)
class PlacementGroupReaper:
    """Removes the worker placement group of a trial's Train run once its controller is gone.

    ASHA ends a trial by ending the trial's process, which takes its Train controller and the
    workers with it; their placement group, though, lives as long as the job. Ray Train's own
    cleaner asks the state API, which a local cluster started without the dashboard does not
    serve, so stopped trials would keep their CPUs/GPUs and later trials would wait forever.
    Runs that shut down normally remove their group themselves and are forgotten here.
    """

    def __init__(self, interval_s: float = 1.0) -> None:
        self._watched: dict[str, tuple[Any, PlacementGroup]] = {}
        self._lock = threading.Lock()
        self._interval_s = interval_s
        threading.Thread(target=self._loop, name="duet-pg-reaper", daemon=True).start()

    def watch(self, key: str, controller: Any, group: PlacementGroup) -> None:
        with self._lock:
            self._watched[key] = (controller, group)

    def forget(self, key: str) -> None:
        with self._lock:
            self._watched.pop(key, None)

    def pending(self) -> int:
        with self._lock:
            return len(self._watched)

    def reap(self) -> int:
        """Remove the groups of dead controllers; returns how many were removed."""
        with self._lock:
            items = list(self._watched.items())
        removed = 0
        for key, (controller, group) in items:
            if _alive(controller):
                continue
            if placement_group_table(group).get("state", "REMOVED") != "REMOVED":
                remove_placement_group(group)
                removed += 1
            with self._lock:
                if key in self._watched and self._watched[key][1] is group:
                    del self._watched[key]
        return removed

    def _loop(self) -> None:
        while True:
            time.sleep(self._interval_s)
            try:
                self.reap()
            except Exception as exc:  # keep watching: a failed check now may pass on the next round
                log.warning("placement-group reaper: %s: %s", type(exc).__name__, exc)


def _alive(controller: Any, timeout_s: float = 10.0) -> bool:
    try:
        ray.get(controller.__ray_ready__.remote(), timeout=timeout_s)
    except (ActorUnavailableError, GetTimeoutError):
        return True  # restarting or busy: ask again next round
    except RayActorError:
        return False
    return True


class ReportPlacementGroup(ControllerCallback, WorkerGroupCallback):
    """Runs in a trial's Train controller: hands each worker group's placement group to the reaper."""

    def __init__(self, reaper: Any, key: str) -> None:
        self._reaper = reaper
        self._key = key
        self._controller: Any = None

    def after_controller_start(self, train_run_context: Any) -> None:
        self._controller = ray.get_runtime_context().current_actor

    def after_worker_group_start(self, worker_group: Any) -> None:
        group = worker_group.get_worker_group_state().placement_group_handle.placement_group
        ray.get(self._reaper.watch.remote(self._key, self._controller, group))

    async def before_controller_shutdown(self) -> None:
        await self._reaper.forget.remote(self._key)

    def before_controller_abort(self) -> None:
        self._reaper.forget.remote(self._key)


def release(reaper: Any, timeout_s: float = 60.0) -> None:
    """Wait until the last stopped trials' placement groups are gone, then end the reaper."""
    deadline = time.monotonic() + timeout_s
    while ray.get(reaper.pending.remote()) and time.monotonic() < deadline:
        ray.get(reaper.reap.remote())
        time.sleep(1.0)
    ray.kill(reaper)
