"""Object storage that throttles: 503 SlowDown answers and dropped connections for a share of the requests.

A ThrottlingProxy on 127.0.0.1 sits in front of the session's moto server (tests/conftest.py). Two
phases share one dataset, one Ray instance and one bucket:

* the dataset is prepared to s3:// with the S3 client's own retries off (`storage.retries: 1`) and every
  12th request faulted (alternately 503 and dropped): each fault reaches duet's whole-operation retry,
  which retries it (and counts it), and the splits read back intact;
* a short training stage (1 worker) reads those shards with Ray Data and uploads its checkpoints with
  Ray Train through the proxy while 20 % of all requests are faulted at random; those retries happen
  inside pyarrow's AWS SDK (`storage.retries` attempts per request), where Python cannot count them, so
  the proxy's own counts prove that reads and checkpoint writes were faulted and still completed.

The retries duet counted in this process (the driver) are on the pipeline run as `storage/retries`. And a
Ray task reading with the driver's filesystem gets `storage.retries` attempts, not pyarrow's default 3.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow.fs as pafs
import pytest
import ray
from conftest import S3Endpoint, free_port
from mlflow.tracking import MlflowClient
from throttling_proxy import ThrottlingProxy

from components import storage
from components.config import DuetConfig, load_config
from components.data.shards import read_manifest, shard_uris
from components.layout import SPLITS, split_uri
from components.tracking.tracker import STORAGE_RETRIES, resolve_tracking_uri
from components.workflow.startup import ensure_dataset
from components.workflow.tracked_stage import run_single_stage

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
STEPS = 4
READS, WRITES = ("GET", "HEAD"), ("PUT", "POST")


@pytest.fixture(scope="module")
def proxy(s3_endpoint: S3Endpoint) -> Iterator[ThrottlingProxy]:
    throttling = ThrottlingProxy(free_port(), urlsplit(s3_endpoint.url).port or 0, seed=7).start()
    try:
        yield throttling
    finally:
        throttling.stop()


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("throttled")


@pytest.fixture(scope="module")
def bucket(s3_endpoint: S3Endpoint) -> str:
    uri = f"s3://throttled-{uuid.uuid4().hex[:10]}"
    storage.ensure_bucket(uri, s3_endpoint.storage_config())  # straight to moto, past the proxy
    return uri


@pytest.fixture(scope="module")
def cluster(s3_endpoint: S3Endpoint) -> Iterator[None]:
    """Local Ray, started after the S3 fixture so workers inherit its credentials."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def _config(work: Path, proxy: ThrottlingProxy, bucket: str, retries: int = 8) -> DuetConfig:
    return load_config(REPO / "pipelines/configs/demo.yaml", [
        f"run.work_dir={work}", f"data.root={bucket}/datasets", f"model.checkpoint={work}/base",
        f"scaling.storage_path={bucket}/runs", f"storage.endpoint_url={proxy.url}", "storage.region=us-east-1",
        f"storage.retries={retries}", "storage.connect_timeout_s=2", "storage.request_timeout_s=10",
        "data.num_records=60", "data.caption_records=40", "data.records_per_shard=10",
        "model.tiny.warmup_steps=0", "model.tiny.vision_warmup_steps=0", "model.tiny.caption_warmup_steps=0", "scaling.num_workers=1",
        "scaling.cpus_per_worker=0.5", "data.preprocess_num_cpus=0.25",
        "stage1.global_batch=4", "stage1.micro_batch=2", f"stage1.max_steps={STEPS}", "stage1.checkpoint_every=2",
    ])


@pytest.fixture(scope="module")
def prepared(work: Path, proxy: ThrottlingProxy, bucket: str) -> dict[str, int]:
    """The dataset written through the proxy with every 12th request faulted and the S3 client not retrying."""
    cfg = _config(work, proxy, bucket, retries=1)
    retries, since = storage.retry_count(), len(proxy.log)
    proxy.every = 12
    try:
        splits = ensure_dataset(cfg)
        # Read back through the same faults: every shard against the size and sha256 its manifest lists.
        for name in SPLITS:
            manifest = read_manifest(split_uri(cfg.data, name), cfg.storage)
            assert manifest == splits[name].manifest and not splits[name].reused
            for uri, shard in zip(shard_uris(split_uri(cfg.data, name), manifest), manifest.shards, strict=True):
                data = storage.read_bytes(uri, cfg.storage)
                assert (len(data), hashlib.sha256(data).hexdigest()) == (shard.size, shard.sha256), uri
    finally:
        proxy.every = None
    actions = [action for _, _, action in proxy.log[since:]]
    return {"retries": storage.retry_count() - retries, "slow-down": actions.count("slow-down"),
            "drop": actions.count("drop"), "reads": proxy.faults(READS, since), "writes": proxy.faults(WRITES, since),
            "records": sum(s.manifest.count for s in splits.values())}


def test_a_dataset_prepared_to_throttled_storage_is_complete_and_the_faults_were_retried(
    prepared: dict[str, int],
) -> None:
    assert prepared["slow-down"] >= 3 and prepared["drop"] >= 3 and prepared["reads"] and prepared["writes"], prepared
    # The S3 client does not retry here (storage.retries=1): duet's retry answered the faults, each once
    # (pyarrow retries a failed CompleteMultipartUpload itself, so not every fault need reach duet).
    assert 0 < prepared["retries"] <= prepared["slow-down"] + prepared["drop"], prepared
    assert prepared["records"] == 60 + 40


def test_ray_processes_keep_the_s3_clients_retries(
    work: Path, proxy: ThrottlingProxy, bucket: str, cluster: None
) -> None:
    # pyarrow pickles an S3 filesystem without its retry strategy: every Ray process (Ray Data's read tasks,
    # Ray Train's controller and workers) got pyarrow's default of 3 attempts, whatever storage.retries said.
    cfg = _config(work, proxy, bucket)
    storage.write_bytes(f"{bucket}/probe", b"probe", cfg.storage)
    fs, path = storage.resolve(f"{bucket}/probe", cfg.storage)

    @ray.remote(num_cpus=0)
    def read(fs: pafs.FileSystem, path: str) -> bytes:
        with fs.open_input_stream(path) as stream:
            return stream.read()

    proxy.fail_next = 3  # one more than pyarrow's default attempts, fewer than storage.retries (8)
    try:
        assert ray.get(read.remote(fs, path)) == b"probe"
    finally:
        left, proxy.fail_next = proxy.fail_next, 0
    assert left == 0, "the three faults were answered"


def test_a_stage_on_throttled_storage_completes_with_every_step(
    work: Path, proxy: ThrottlingProxy, bucket: str, cluster: None, prepared: dict[str, int]
) -> None:
    cfg = _config(work, proxy, bucket)
    since = len(proxy.log)
    proxy.slow_down, proxy.drop = 0.15, 0.05
    try:
        outcome = run_single_stage(cfg, 1)
    finally:
        proxy.slow_down = proxy.drop = 0.0
    total_retries = storage.retry_count()

    assert not outcome.reused and outcome.metrics["step"] == STEPS
    assert storage.exists(storage.join(outcome.artifact_uri, "artifact.json"), cfg.storage)
    checkpoints = {uri.split("/")[-2] for uri in storage.list_files(f"{bucket}/runs", cfg=cfg.storage)
                   if "/runs/demo-stage1-" in uri and "/checkpoint_" in uri and uri.endswith("progress.json")}
    assert len(checkpoints) == 2, checkpoints  # steps 2 and 4, Ray Train keeps two

    # The faults were real: on reads of the shards (Ray Data's, and the driver's checks) and on Ray Train's
    # checkpoint uploads, and on a fair share of all requests.
    assert proxy.faults(READS, since, under="/shard-") > 0
    assert proxy.faults(WRITES, since, under="/runs/demo-stage1-") > 0
    assert proxy.faults(READS + WRITES, since) >= 0.1 * (len(proxy.log) - since)

    client = MlflowClient(resolve_tracking_uri(cfg.tracking, cfg.run.work_dir))
    stage_run = client.get_run(outcome.run_id)
    assert [m.step for m in client.get_metric_history(outcome.run_id, "loss")] == list(range(1, STEPS + 1))
    parent = client.get_run(stage_run.data.tags["mlflow.parentRunId"])
    # The driver's count since it started, the data preparation before the pipeline run included.
    assert parent.data.metrics[STORAGE_RETRIES] == total_retries >= prepared["retries"] > 0
    assert 0 <= stage_run.data.metrics[STORAGE_RETRIES] <= total_retries - prepared["retries"]
