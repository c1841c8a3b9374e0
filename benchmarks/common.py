"""Timing helpers shared by the benchmarks: interleaved repetitions, paired ratios, JSON, tables.

Machines running these are shared and noisy, so absolute times drift during a run. Every
comparison is therefore measured side by side: each repetition runs every case once (in a
rotated order, so no case always goes first), and a ratio is the median over repetitions of the
per-repetition ratio case / baseline. Neighbouring measurements share the machine's state at that
moment, so the paired ratio is much steadier than a ratio of two separately taken medians.

On a shared CPU the clock can be the process's CPU time instead of wall time: with one
intra-op thread all the work runs on the calling thread, and CPU time leaves out the stretches
in which a neighbouring process holds the core (wall-time spread of 2x, CPU-time spread of
about 1.3x, measured side by side on a loaded 2-vCPU machine). Wall time is always kept too.
"""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


CLOCKS = ("wall", "process")


@dataclass(frozen=True)
class Timing:
    """Per-repetition seconds of every case on the chosen clock (`samples`) and on the wall clock."""

    samples: dict[str, list[float]]
    wall: dict[str, list[float]]
    clock: str = "wall"

    def median(self, name: str) -> float:
        return statistics.median(self.samples[name])

    def ratios(self, baseline: str) -> dict[str, float]:
        """Median over repetitions of (case / baseline) measured in the same repetition."""
        base = self.samples[baseline]
        return {
            name: statistics.median(t / b for t, b in zip(times, base)) for name, times in self.samples.items()
        }

    def repetitions(self) -> list[dict[str, float]]:
        """Each repetition's seconds per case, for ratios of sums measured together."""
        count = len(next(iter(self.samples.values())))
        return [{name: times[i] for name, times in self.samples.items()} for i in range(count)]

    def ratio_spread(self, baseline: str) -> dict[str, tuple[float, float]]:
        """The (25th, 75th) percentile of the paired ratios: how much the repetitions disagree."""
        base = self.samples[baseline]
        spread = {}
        for name, times in self.samples.items():
            paired = sorted(t / b for t, b in zip(times, base))
            spread[name] = (_percentile(paired, 0.25), _percentile(paired, 0.75))
        return spread


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile of an already sorted list."""
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = q * (len(sorted_values) - 1)
    low = math.floor(pos)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (pos - low)


def synchronize(device: torch.device | str) -> None:
    """Wait for queued GPU work, so a timer measures the work and not its launch."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure_interleaved(
    cases: Mapping[str, Callable[[], Any]],
    repeats: int,
    warmup: int = 1,
    number: int | Mapping[str, int] = 1,
    device: torch.device | str = "cpu",
    progress: str | None = None,
    clock: str = "wall",
) -> Timing:
    """Time every case `repeats` times, interleaved; a sample is the mean of `number` back-to-back calls.

    `number` may differ per case (a mapping), so a short case and a long one both last long
    enough per sample while staying in the same repetition.

    `warmup` untimed calls per case come first (allocator, kernel selection, caches). The order of
    cases rotates by one each repetition. The garbage collector runs between repetitions only:
    objects alive at the start are frozen (a full collection over several models costs a good
    fraction of a second), and a collection triggered by one case is never billed to it.
    """
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {CLOCKS}, got {clock!r}")
    names = list(cases)
    calls = {name: number if isinstance(number, int) else number.get(name, 1) for name in names}
    if repeats < 1 or min(calls.values()) < 1:
        raise ValueError(f"repeats and number must be >= 1, got {repeats} and {number}")
    for _ in range(warmup):
        for name in names:
            cases[name]()
    synchronize(device)
    samples: dict[str, list[float]] = {name: [] for name in names}
    wall: dict[str, list[float]] = {name: [] for name in names}
    gc.collect()
    gc.freeze()
    try:
        for rep in range(repeats):
            gc.collect()
            gc.disable()
            shift = rep % len(names)
            for name in names[shift:] + names[:shift]:
                synchronize(device)
                start, start_cpu = time.perf_counter(), time.process_time()
                for _ in range(calls[name]):
                    cases[name]()
                synchronize(device)
                elapsed = time.perf_counter() - start
                wall[name].append(elapsed / calls[name])
                used = elapsed if clock == "wall" else time.process_time() - start_cpu
                samples[name].append(used / calls[name])
            gc.enable()
            if progress and (rep + 1 == repeats or (rep + 1) % 5 == 0):
                print(f"  {progress}: repetition {rep + 1}/{repeats}", file=sys.stderr, flush=True)
    finally:
        gc.enable()
        gc.unfreeze()
    return Timing(samples, wall, clock)


def default_clock(device: torch.device | str) -> str:
    """CPU time on a CPU run with one intra-op thread (see the module docstring), else wall time."""
    single = torch.get_num_threads() == 1
    return "process" if torch.device(device).type == "cpu" and single else "wall"


def machine() -> dict[str, Any]:
    """What the numbers were measured on: CPU model and count, threads, accelerator, versions."""
    cpu_model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu": cpu_model,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def write_json(path: str | Path | None, payload: Mapping[str, Any]) -> None:
    """Write `payload` as indented JSON (creating parent folders); nothing when `path` is None."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (pipes aligned), so printed output pastes straight into docs/benchmarks.md."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if value == 0 or 1e-3 <= abs(value) < 1e5:
            return f"{value:.3f}"
        return f"{value:.3g}"
    return str(value)


def seconds(value: float) -> str:
    """A duration with a readable unit."""
    if value < 1e-3:
        return f"{value * 1e6:.0f} us"
    if value < 1:
        return f"{value * 1e3:.2f} ms"
    return f"{value:.2f} s"


def mib(num_bytes: float) -> float:
    return num_bytes / 2**20


def resolve_dtype(name: str) -> torch.dtype:
    """torch dtype from its short name (float32, bfloat16, float16)."""
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"--dtype must be one of {sorted(dtypes)}, got {name!r}")
    return dtypes[name]
