"""Streaming memory: peak memory of the driver and the Ray processes while build_dataset streams a split from S3.

    python benchmarks/stream_memory.py                                  # 10k records (about a minute, 2 CPUs)
    python benchmarks/stream_memory.py --sizes 10000 100000 --json stream.json
    python benchmarks/stream_memory.py --full                           # 10k, 100k and 1M (about 20 min)

For each size a synthetic split (small images, data.image_size 32, and a tiny processor with a 32 px
crop, so the run measures the pipeline rather than pixel work) is written to an S3 endpoint on
127.0.0.1 and streamed through components.data.dataset.build_dataset (validation, tokenisation, CLIP
transform in actor pools) into iter_torch_batches with the trainer's collate function. Writing and
streaming each run in a process of their own, so the driver that streams starts clean, with a fresh
local Ray instance. A thread samples, every 0.25 s, the driver and every process below it
(Ray's GCS, raylet, workers and actors). The S3 endpoint (moto) runs in its own process outside that
tree: it holds the whole dataset in memory, which says nothing about the pipeline.

The figure is the proportional set size (PSS) summed over those processes: each shared page (Ray's
object store, shared libraries) is split among the processes that map it, so the sum is the physical
memory the pipeline holds. The RSS sum is printed too; it counts a shared page once per process that
maps it, so it over-states memory and grows with the number of processes. "Driver private" is the
driver's RSS less its shared pages.

Streaming keeps memory bounded when the peak does not grow with the dataset: compare the peaks across
sizes, and within one run the peak over the first and the second half of the records. What does grow
with the number of shards, up to a cap set by the CPUs, is how many read tasks run at once (each in a
Ray worker process): a split of 2 shards never runs more than 2.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import psutil

from benchmarks.common import format_table, machine, write_json

FAKE_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
MiB = 2**20
T = TypeVar("T")
DEFAULT_SIZES = (10_000,)
FULL_SIZES = (10_000, 100_000, 1_000_000)


@dataclass
class Sample:
    seconds: float
    records_done: int
    driver: int
    driver_private: int  # the driver's RSS less its shared pages (the object store it maps, libraries)
    ray: int
    ray_processes: int
    pss: int  # proportional set size of the driver and the Ray processes: shared pages split among their users


    @property
    def total(self) -> int:
        return self.driver + self.ray


@dataclass
class SizeResult:
    records: int
    shards: int
    write_s: float
    stream_s: float
    idle_pss_mib: float  # driver + idle Ray instance, before streaming
    peak_pss_mib: float  # the memory the pipeline holds: driver + Ray processes, shared pages counted once
    pss_first_half_mib: float  # peak over the first half of the records
    pss_second_half_mib: float  # and over the second
    peak_processes: int  # Ray processes at once (each a Python interpreter with Ray loaded)
    peak_driver_private_mib: float
    peak_rss_sum_mib: float  # RSS summed over the processes: counts the object store once per process mapping it
    store_rss_mib: float  # the S3 endpoint's process (the dataset in memory), for reference
    samples: list[Sample] = field(default_factory=list, repr=False)

    @property
    def records_per_s(self) -> float:
        return self.records / self.stream_s


class TreeSampler:
    """RSS of this process and of all its descendants except `exclude` (apart), and their PSS, every `interval_s`."""

    def __init__(self, exclude: set[int], interval_s: float = 0.25) -> None:
        self.exclude = exclude
        self.interval_s = interval_s
        self.samples: list[Sample] = []
        self.records_done = 0  # updated by the consumer
        self._start = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss-sampler")

    def measure(self) -> Sample:
        me = psutil.Process()
        driver = me.memory_full_info()
        ray = processes = 0
        pss = driver.pss
        for proc in me.children(recursive=True):
            try:
                if proc.pid not in self.exclude:
                    memory = proc.memory_full_info()
                    ray += memory.rss
                    pss += memory.pss
                    processes += 1
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return Sample(time.perf_counter() - self._start, self.records_done, driver.rss, driver.rss - driver.shared,
                      ray, processes, pss)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self.measure())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(self.measure())


def start_store() -> tuple[subprocess.Popen[bytes], str]:
    """moto's S3 server in its own process on a free 127.0.0.1 port (outside the measured tree's sums)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process, f"http://127.0.0.1:{port}"
        except OSError:
            if process.poll() is not None:
                raise RuntimeError("the S3 endpoint (moto) exited at start") from None
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("the S3 endpoint (moto) did not start within 60 s")


def _mib(value: float) -> float:
    return round(value / MiB, 1)


def _config(records: int, args: argparse.Namespace, endpoint: str):  # -> DuetConfig (imported late)
    from components.config import DuetConfig

    return DuetConfig.model_validate({
        "storage": {"endpoint_url": endpoint, "region": "us-east-1"},
        "data": {"root": "s3://bench/stream", "name": f"shapes-{records}", "num_records": records,
                 "caption_records": 1, "val_fraction": 0, "test_fraction": 0,
                 "records_per_shard": args.records_per_shard, "image_size": args.image_size,
                 "transform_concurrency": args.concurrency, "preprocess_batch_size": args.batch_size},
        "model": {"max_length": 512, "tiny": {"image_size": args.crop, "patch_size": args.patch}},
    })


def write_split(records: int, args: argparse.Namespace, endpoint: str) -> float:
    """Write the split to the S3 endpoint; seconds taken."""
    from components.data.prepare import prepare
    from components.storage import ensure_bucket

    cfg = _config(records, args, endpoint)
    ensure_bucket("s3://bench", cfg.storage)
    started = time.perf_counter()
    prepare(cfg.data, cfg.storage)
    return time.perf_counter() - started


def measure_size(records: int, args: argparse.Namespace, endpoint: str, store_pid: int, processor_dir: str,
                 write_s: float) -> SizeResult:
    """Stream the written split once, sampling memory; run in a fresh process (see `in_fresh_process`)."""
    import ray

    from components.data.dataset import build_dataset, make_collate
    from components.data.shards import read_manifest
    from components.layout import split_uri

    cfg = _config(records, args, endpoint)
    store = psutil.Process(store_pid)
    uri = split_uri(cfg.data, "train")
    manifest = read_manifest(uri, cfg.storage)
    print(f"{records} records: written in {write_s:.0f}s ({manifest.count} in {len(manifest.shards)} shards)",
          flush=True)

    gc.collect()
    ray.init(num_cpus=args.num_cpus, object_store_memory=args.object_store_mib * MiB, include_dashboard=False,
             log_to_driver=False)
    try:
        num_visual = (args.crop // args.patch) ** 2
        collate = make_collate(processor_dir)
        time.sleep(2)  # let the fresh instance settle before the idle reading
        sampler = TreeSampler(exclude={store.pid})
        idle = sampler.measure()
        started = time.perf_counter()
        with sampler:
            dataset = build_dataset(uri, cfg, processor_dir, num_visual)
            for batch in dataset.iter_torch_batches(batch_size=args.batch_size, collate_fn=collate):
                sampler.records_done += int(batch["input_ids"].shape[0])
        stream_s = time.perf_counter() - started
    finally:
        ray.shutdown()
    if sampler.records_done != manifest.count:
        raise RuntimeError(f"streamed {sampler.records_done} of {manifest.count} records")
    samples = sampler.samples
    half = manifest.count / 2
    first = [s.pss for s in samples if s.records_done <= half] or [0]
    second = [s.pss for s in samples if s.records_done > half] or [0]
    result = SizeResult(
        records=manifest.count, shards=len(manifest.shards), write_s=round(write_s, 1), stream_s=round(stream_s, 1),
        idle_pss_mib=_mib(idle.pss), peak_pss_mib=_mib(max(s.pss for s in samples)),
        pss_first_half_mib=_mib(max(first)), pss_second_half_mib=_mib(max(second)),
        peak_processes=max(s.ray_processes for s in samples),
        peak_driver_private_mib=_mib(max(s.driver_private for s in samples)),
        peak_rss_sum_mib=_mib(max(s.total for s in samples)),
        store_rss_mib=_mib(store.memory_info().rss), samples=samples,
    )
    print(f"{records} records: streamed in {stream_s:.0f}s, peak {result.peak_pss_mib:.0f} MiB "
          f"(PSS of the driver and {result.peak_processes} Ray processes)", flush=True)
    return result


def in_fresh_process(fn: Callable[..., T], *fn_args: Any) -> T:
    """`fn(*fn_args)` in a new interpreter (multiprocessing spawn), its result returned."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, fn_args)


def table(results: list[SizeResult]) -> str:
    rows = [
        [r.records, r.shards, *(round(v) for v in (r.write_s, r.stream_s, r.records_per_s)), r.peak_processes,
         *(round(v) for v in (r.idle_pss_mib, r.peak_pss_mib, r.pss_first_half_mib, r.pss_second_half_mib,
                              r.peak_driver_private_mib, r.peak_rss_sum_mib))]
        for r in results
    ]
    text = format_table(
        ["records", "shards", "write s", "stream s", "records/s", "Ray processes", "idle MiB", "peak MiB",
         "peak 1st half", "peak 2nd half", "driver private MiB", "RSS sum MiB"], rows)
    if len(results) > 1:
        last = results[-1]
        text += "\npeak memory (PSS) against the largest run: " + ", ".join(
            f"{r.records} records {r.peak_pss_mib / last.peak_pss_mib:.2f}x" for r in results[:-1])
    return text


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES), help="records per run")
    parser.add_argument("--full", action="store_true", help=f"sizes {', '.join(map(str, FULL_SIZES))}")
    parser.add_argument("--records-per-shard", type=int, default=5000)
    parser.add_argument("--image-size", type=int, default=32, help="side of the synthetic images (>= 24)")
    parser.add_argument("--crop", type=int, default=32, help="processor crop size")
    parser.add_argument("--patch", type=int, default=8, help="vision patch size (visual tokens = (crop/patch)^2)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=1, help="image-transform actors")
    parser.add_argument("--num-cpus", type=int, default=4, help="CPUs given to the local Ray instance")
    parser.add_argument("--object-store-mib", type=int, default=256, help="Ray object store size")
    parser.add_argument("--json", dest="json_path", help="also write the results (with the RSS timelines) here")
    args = parser.parse_args(argv)
    sizes = sorted(set(FULL_SIZES if args.full else args.sizes))
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.update(FAKE_CREDENTIALS)

    from components.config import TinyModelSection
    from components.model.tiny import build_tiny_processor

    process, endpoint = start_store()
    results = []
    try:
        with tempfile.TemporaryDirectory(prefix="duet-stream-") as tmp:
            processor_dir = build_tiny_processor(TinyModelSection(image_size=args.crop, patch_size=args.patch), tmp)
            for records in sizes:
                # Each step in a fresh process: what one run leaves in a driver (Python heap from writing,
                # Ray's per-init state) must not be counted against the next size.
                write_s = in_fresh_process(write_split, records, args, endpoint)
                results.append(in_fresh_process(measure_size, records, args, endpoint, process.pid, processor_dir,
                                                write_s))
    finally:
        process.terminate()
        process.wait(timeout=30)
    print(table(results))
    write_json(args.json_path, {
        "benchmark": "stream_memory", "machine": machine(), "args": vars(args) | {"sizes": sizes},
        "results": [asdict(r) | {"records_per_s": r.records_per_s} for r in results],
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
