"""Ingest throughput: the full Ray Data pipeline from an S3 endpoint vs. a one-process decode+transform loop.

    python benchmarks/ingest.py                       # about a minute on 2 CPUs
    python benchmarks/ingest.py --records 20000 --image-size 336 --crop 224 --json ingest.json

Both sides read the same synthetic split from an S3 endpoint started here
(moto on 127.0.0.1). The pipeline side streams it through build_dataset
(validation, tokenisation, CLIP transform in actor pools) into
iter_torch_batches with the collate function, as a trainer would. The baseline
reads the same shards in this process and only decodes and transforms the
images (no tokenisation, no Ray), i.e. the per-image work done by hand. Peak
memory is the largest sampled sum of resident set sizes of this process and all
its children (Ray's GCS, raylet and workers); shared memory counts once per
process, so it is an upper bound.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import socket
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import psutil

FAKE_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}


@dataclass
class Result:
    """`steady_samples_per_s` counts from the first batch on: an upper bound for the pipeline, whose
    stages keep working (up to their prefetch budget) while the driver waits for that first batch."""

    name: str
    samples: int
    seconds: float
    first_batch_s: float
    steady_samples_per_s: float
    peak_rss_mib: float

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds


class RssSampler:
    """Peak summed RSS of this process and its descendants, sampled in a thread."""

    def __init__(self, interval_s: float = 0.2) -> None:
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        me = psutil.Process()
        total = 0
        for proc in [me, *me.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._sample())


def start_s3() -> tuple[object, str]:
    """A real S3 endpoint (moto) on a free 127.0.0.1 port, with fake credentials in the environment."""
    from moto.server import ThreadedMotoServer

    os.environ.update(FAKE_CREDENTIALS)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server, f"http://127.0.0.1:{port}"


def timed(name: str, batches: Callable[[], object], count: Callable[[object], int]) -> Result:
    """Consume the batches, stamping each; RSS is sampled throughout."""
    start = time.perf_counter()
    stamps: list[tuple[float, int]] = []
    samples = 0
    with RssSampler() as rss:
        for batch in batches():
            samples += count(batch)
            stamps.append((time.perf_counter() - start, samples))
    if not stamps:
        raise RuntimeError(f"{name}: no batches")
    (t_first, n_first), (t_end, n_end) = stamps[0], stamps[-1]
    steady = (n_end - n_first) / (t_end - t_first) if t_end > t_first else float("nan")
    return Result(name, samples, stamps[-1][0], stamps[0][0], steady, rss.peak / 2**20)


def baseline_batches(shard_uris: list[str], storage_cfg, spec, max_pixels: int, batch_size: int):
    """Decode + CLIP transform only, one process: read each shard, decode its images, normalise per batch."""
    from components import storage
    from components.data.records import decode_image
    from components.data.transform import normalize, resize_and_crop

    pending: list[np.ndarray] = []
    for uri in shard_uris:
        with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(uri, storage_cfg))) as tar:
            for member in tar.getmembers():
                if member.name.endswith((".png", ".jpg")):
                    image = decode_image(tar.extractfile(member).read(), max_pixels)
                    pending.append(resize_and_crop(image, spec))
                    if len(pending) == batch_size:
                        yield normalize(np.stack(pending), spec)
                        pending = []
    if pending:
        yield normalize(np.stack(pending), spec)


def run(args: argparse.Namespace) -> list[Result]:
    import ray

    from components.config import DuetConfig, TinyModelSection
    from components.data.dataset import build_dataset, make_collate
    from components.data.prepare import prepare
    from components.data.shards import read_manifest, shard_uris
    from components.data.transform import load_image_spec
    from components.layout import split_uri
    from components.model.tiny import build_tiny_processor
    from components.storage import ensure_bucket

    server, endpoint = start_s3()
    try:
        tiny = TinyModelSection(image_size=args.crop, patch_size=args.patch)
        num_visual = (args.crop // args.patch) ** 2
        cfg = DuetConfig.model_validate({
            "storage": {"endpoint_url": endpoint, "region": "us-east-1"},
            "data": {"root": "s3://bench/datasets", "num_records": args.records, "caption_records": 1,
                     "val_fraction": 0, "test_fraction": 0, "records_per_shard": args.records_per_shard,
                     "image_size": args.image_size, "transform_concurrency": args.concurrency},
            "model": {"max_length": 1024 + num_visual},
        })
        ensure_bucket("s3://bench", cfg.storage)
        t0 = time.perf_counter()
        prepare(cfg.data, cfg.storage)
        print(f"wrote {args.records} synthetic records ({args.image_size}px) to the S3 endpoint "
              f"in {time.perf_counter() - t0:.1f}s", flush=True)
        uri = split_uri(cfg.data, "train")
        manifest = read_manifest(uri, cfg.storage)
        with tempfile.TemporaryDirectory() as tmp:
            processor_dir = build_tiny_processor(tiny, tmp)
            spec = load_image_spec(processor_dir)
            baseline = timed(
                "decode+transform loop (1 process)",
                lambda: baseline_batches(shard_uris(uri, manifest), cfg.storage, spec, cfg.data.max_image_pixels,
                                         args.batch_size),
                lambda batch: len(batch),
            )
            print(f"baseline done: {baseline.samples_per_s:.0f} samples/s", flush=True)
            ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
            try:
                collate_fn = make_collate(processor_dir)
                pipeline = timed(
                    f"Ray Data pipeline (S3 -> collate, {args.concurrency} transform actor(s))",
                    lambda: build_dataset(uri, cfg, processor_dir, num_visual).iter_torch_batches(
                        batch_size=args.batch_size, collate_fn=collate_fn),
                    lambda batch: int(batch["input_ids"].shape[0]),
                )
            finally:
                ray.shutdown()
        if pipeline.samples != manifest.count or baseline.samples != manifest.count:
            raise RuntimeError(f"expected {manifest.count} samples, pipeline gave {pipeline.samples}, "
                               f"baseline {baseline.samples}")
        return [pipeline, baseline]
    finally:
        server.stop()


def table(results: list[Result]) -> str:
    lines = [f"{'run':<58} {'samples':>8} {'seconds':>8} {'1st batch s':>11} {'samples/s':>10} "
             f"{'after 1st/s':>11} {'peak RSS MiB':>13}"]
    for r in results:
        lines.append(f"{r.name:<58} {r.samples:>8} {r.seconds:>8.1f} {r.first_batch_s:>11.1f} "
                     f"{r.samples_per_s:>10.1f} {r.steady_samples_per_s:>11.1f} {r.peak_rss_mib:>13.0f}")
    pipeline, baseline = results
    lines.append(f"pipeline / baseline: {pipeline.samples_per_s / baseline.samples_per_s:.2f}x overall, "
                 f"{pipeline.steady_samples_per_s / baseline.steady_samples_per_s:.2f}x after the first batch "
                 f"(the pipeline also validates, tokenises and collates; the baseline only decodes and transforms)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=4000, help="synthetic training records")
    parser.add_argument("--records-per-shard", type=int, default=500)
    parser.add_argument("--image-size", type=int, default=128, help="side of the synthetic images")
    parser.add_argument("--crop", type=int, default=64, help="processor crop size (the vision tower's input)")
    parser.add_argument("--patch", type=int, default=8, help="vision patch size (visual tokens = (crop/patch)^2)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=1, help="image-transform actors (data.transform_concurrency)")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs given to the local Ray instance")
    parser.add_argument("--json", dest="json_path", help="also write the results here")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    results = run(args)
    print(table(results))
    if args.json_path:
        payload = {"args": vars(args), "results": [
            {**asdict(r), "samples_per_s": r.samples_per_s, "steady_samples_per_s": r.steady_samples_per_s}
            for r in results],
            "ratio": results[0].samples_per_s / results[1].samples_per_s,
            "ratio_after_first_batch": results[0].steady_samples_per_s / results[1].steady_samples_per_s}
        Path(args.json_path).write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
