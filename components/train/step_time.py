"""Where a training step's time goes: data wait, forward, backward, optimizer, gradient communication, reporting.

Each phase is wall-clock time on the worker (rank 0's is logged), measured with `perf_counter` around the
training loop's own calls, so the phases of a step add up to its `step_time_s`:

- `data_wait`: waiting for the next micro-batch from Ray Data and moving it to the device;
- `forward`, `backward`, `optimizer`: DeepSpeed's forward, `engine.backward` and `engine.step`;
- `comm`: the collectives DeepSpeed runs inside backward (ZeRO-2 reduces gradient buckets from its hooks)
  and inside the optimizer step (the updated partitions are gathered), timed at the collective calls
  themselves and taken out of the phase they ran in;
- `report`: what the loop does between steps for the driver: the metrics all-reduce, validation,
  `ray.train.report` and checkpoints. It is counted in the step that follows it.

On GPU every phase and every collective ends with a device synchronize, so the times are the device's
work and not the host's kernel launches (duet's ZeRO config turns `overlap_comm` off, so no overlap is
lost; a few synchronizes per micro-batch). Kept free of DeepSpeed and Ray imports: the driver summarises the rows with it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import wraps
from typing import Any

PHASES = ("data_wait", "forward", "backward", "optimizer", "comm", "report")
PHASE_LABELS = {"data_wait": "data wait", "comm": "gradient communication"}

# deepspeed.comm's backend calls that move data between ranks (what ZeRO's reductions and gathers use).
COLLECTIVES = (
    "all_reduce", "all_reduce_coalesced", "inference_all_reduce", "reduce", "reduce_scatter",
    "reduce_scatter_tensor", "all_gather", "all_gather_into_tensor", "all_gather_coalesced", "broadcast",
    "all_to_all_single", "all_to_all",
)


def metric_name(phase: str) -> str:
    """The step metric that holds a phase's seconds, e.g. `time/forward_s`."""
    return f"time/{phase}_s"


class StepClock:
    """Seconds per phase since the last `take()`; communication inside a phase is booked as `comm` only."""

    def __init__(self, synchronize: Callable[[], None] | None = None) -> None:
        self._seconds = dict.fromkeys(PHASES, 0.0)
        self.synchronize = synchronize or (lambda: None)  # torch.cuda.synchronize on GPU

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if name not in PHASES or name == "comm":
            raise ValueError(f"unknown step phase {name!r}; one of {[p for p in PHASES if p != 'comm']}")
        started, comm_before = time.perf_counter(), self._seconds["comm"]
        try:
            yield
        finally:
            self.synchronize()
            elapsed = time.perf_counter() - started
            self._seconds[name] += elapsed - (self._seconds["comm"] - comm_before)

    def add_comm(self, seconds: float) -> None:
        self._seconds["comm"] += seconds

    def take(self) -> dict[str, float]:
        """The phases' seconds as step metrics, and a fresh start for the next step."""
        taken = {metric_name(p): s for p, s in self._seconds.items()}
        self._seconds = dict.fromkeys(PHASES, 0.0)
        return taken


def time_collectives(clock: StepClock, backend: Any) -> None:
    """Book the time of every collective `backend` (deepspeed.comm's `cdb`) runs as the clock's `comm`."""

    def timed(call: Callable[..., Any]) -> Callable[..., Any]:
        @wraps(call)
        def run(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                clock.synchronize()
                clock.add_comm(time.perf_counter() - started)

        return run

    for name in COLLECTIVES:
        call = getattr(backend, name, None)
        if callable(call):
            setattr(backend, name, timed(call))  # on this instance only


def mean_breakdown(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Mean seconds per step of each phase over the rows that carry the breakdown."""
    timed = [r for r in rows if all(metric_name(p) in r for p in PHASES)]
    if not timed:
        return {}
    return {p: sum(float(r[metric_name(p)]) for r in timed) / len(timed) for p in PHASES}


def format_breakdown(rows: Sequence[dict[str, Any]]) -> str | None:
    """One line: the mean step time and each phase's share of it (None without timed rows)."""
    means = mean_breakdown(rows)
    total = sum(means.values())
    if total <= 0:
        return None
    shares = ", ".join(f"{PHASE_LABELS.get(p, p)} {100 * means[p] / total:.0f}%" for p in PHASES)
    return f"{total:.2f} s per step: {shares}"
