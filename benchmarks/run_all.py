"""Run every benchmark at its CPU size, each in its own process, and collect the JSON results.

    .venv/bin/python benchmarks/run_all.py                    # what `make bench` runs
    .venv/bin/python benchmarks/run_all.py --only adapters,vce --results .duet/bench
    .venv/bin/python benchmarks/run_all.py --quick             # smoke-test sizes, seconds each

Each benchmark writes RESULTS/NAME.json; stdout/stderr go to RESULTS/NAME.log and a summary
(one line per benchmark: ok, failed, skipped, timed out) ends the run, also as RESULTS/summary.json.
A benchmark whose script is not in the tree is skipped with a note. The whole run keeps to a
time budget: each benchmark gets what is left of it, so `make bench` ends in bounded time.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent


@dataclass(frozen=True)
class Benchmark:
    name: str
    script: str
    args: tuple[str, ...] = ()
    quick_args: tuple[str, ...] | None = None  # None: no smoke-test size


BENCHMARKS = (
    Benchmark("adapters", "adapters.py", ("--preset", "cpu"), ("--quick",)),
    Benchmark("vce", "vce.py", ("--preset", "cpu"), ("--quick",)),
    Benchmark("ingest", "ingest.py"),
    Benchmark("train_throughput", "train_throughput.py", (), ("--quick",)),
    Benchmark("packing", "packing.py", (), ("--quick",)),
    Benchmark("serve", "serve.py", (), ("--quick",)),
)


@dataclass
class Outcome:
    name: str
    status: str  # ok | failed | skipped | timed_out
    seconds: float
    json: str | None
    note: str = ""


def run_one(bench: Benchmark, results: Path, timeout: float, quick: bool = False) -> Outcome:
    """Run one benchmark script with its own --json file; never raises for the benchmark's failures."""
    script = HERE / bench.script
    if not script.is_file():
        return Outcome(bench.name, "skipped", 0.0, None, f"benchmarks/{bench.script} is not in the tree")
    if quick and bench.quick_args is None:
        return Outcome(bench.name, "skipped", 0.0, None, "has no --quick size")
    if timeout <= 0:
        return Outcome(bench.name, "skipped", 0.0, None, "no time left in the budget")
    out = results / f"{bench.name}.json"
    log = results / f"{bench.name}.log"
    out.unlink(missing_ok=True)
    args = bench.quick_args if quick and bench.quick_args is not None else bench.args
    command = [sys.executable, str(script), *args, "--json", str(out)]
    shown = " ".join([f"benchmarks/{bench.script}", *args, "--json", str(out)])
    print(f"== {bench.name}: {shown} (budget {timeout:.0f} s)", flush=True)
    start = time.monotonic()
    # Its own session, so a timeout also stops what it started (Ray's processes, for one).
    proc = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    timer = threading.Timer(timeout, _stop_group, args=(proc,))
    timer.start()
    try:
        with log.open("w") as handle:
            for line in proc.stdout or ():  # echo progress as it comes, keep it all in the log
                handle.write(line)
                print(f"   {line}", end="", flush=True)
        returncode = proc.wait()
    finally:
        timer.cancel()
    elapsed = time.monotonic() - start
    if elapsed >= timeout and returncode != 0:
        return Outcome(bench.name, "timed_out", elapsed, None, f"stopped after {timeout:.0f} s; see {log}")
    if returncode != 0:
        return Outcome(bench.name, "failed", elapsed, None, f"exit status {returncode}; see {log}")
    if not out.is_file():
        return Outcome(bench.name, "failed", elapsed, None, f"wrote no {out.name}; see {log}")
    return Outcome(bench.name, "ok", elapsed, str(out))


def _stop_group(proc: subprocess.Popen) -> None:
    """Stop a benchmark that ran out of time and its children: SIGTERM, then SIGKILL after 10 s."""
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=str(REPO_ROOT / ".duet" / "bench"),
                        help="folder for the JSON results and logs (default: .duet/bench)")
    parser.add_argument("--only", help="comma-separated benchmark names: " + ",".join(b.name for b in BENCHMARKS))
    parser.add_argument("--budget", type=float, default=570.0, help="seconds for the whole run")
    parser.add_argument("--quick", action="store_true", help="smoke-test sizes; benchmarks without one are skipped")
    args = parser.parse_args(argv)
    chosen = list(BENCHMARKS)
    if args.only:
        names = args.only.split(",")
        unknown = sorted(set(names) - {b.name for b in BENCHMARKS})
        if unknown:
            parser.error(f"unknown benchmark(s) {unknown}; choose from {[b.name for b in BENCHMARKS]}")
        chosen = [b for b in BENCHMARKS if b.name in names]
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget
    outcomes = [run_one(bench, results, deadline - time.monotonic(), args.quick) for bench in chosen]
    print("\nSummary")
    for o in outcomes:
        detail = o.json if o.status == "ok" else o.note
        print(f"  {o.name:<18} {o.status:<10} {o.seconds:7.1f} s  {detail}")
    (results / "summary.json").write_text(json.dumps([asdict(o) for o in outcomes], indent=2) + "\n")
    return 1 if any(o.status in ("failed", "timed_out") for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
