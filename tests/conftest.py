"""Shared fixtures: a real S3 endpoint (moto's threaded server on 127.0.0.1) and the tiny processor.

`s3_endpoint` starts one server per test session and puts fake AWS credentials
into the environment for its lifetime (restored afterwards). Request it
*before* starting Ray in a module fixture, so Ray's worker processes inherit the
credentials; `s3_bucket` gives each test its own fresh bucket.
"""

from __future__ import annotations

import logging
import os
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import settings
from moto.server import ThreadedMotoServer
from ports import free_port

from components import storage
from components.config import DuetConfig, StorageSection, TinyModelSection, load_config

REPO = Path(__file__).resolve().parents[1]

# Property tests run the same examples on every run, so a red CI run is reproducible.
settings.register_profile("duet", derandomize=True, deadline=None)
settings.load_profile("duet")

FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing-access-key",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
    "AWS_SESSION_TOKEN": "testing-session-token",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@dataclass(frozen=True)
class S3Endpoint:
    """A running S3-compatible endpoint and the storage config that reaches it."""

    url: str

    def storage_config(self, **overrides: object) -> StorageSection:
        return StorageSection(endpoint_url=self.url, region="us-east-1", retries=2, **overrides)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[S3Endpoint]:
    saved = {name: os.environ.get(name) for name in FAKE_AWS_ENV}
    os.environ.update(FAKE_AWS_ENV)
    port = free_port()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield S3Endpoint(url=f"http://127.0.0.1:{port}")
    finally:
        server.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture
def s3_bucket(s3_endpoint: S3Endpoint) -> str:
    """A fresh, empty bucket on the test endpoint, as an s3:// URI."""
    uri = f"s3://test-{uuid.uuid4().hex[:12]}"
    storage.ensure_bucket(uri, s3_endpoint.storage_config())
    return uri


@pytest.fixture(scope="session")
def tiny_processor_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny model's processor directory (tokenizer with <image>/<pad>/</s>, CLIP image processor config)."""
    from components.model.tiny import build_tiny_processor

    path: Path = tmp_path_factory.mktemp("tiny-processor")
    return build_tiny_processor(TinyModelSection(), path)


@pytest.fixture(scope="session")
def tiny_cfg(tmp_path_factory: pytest.TempPathFactory) -> DuetConfig:
    """The demo config on a tiny base saved without warm-up (adapter r=8): for model-level tests."""
    from components.model.tiny import save_tiny_checkpoint

    path = tmp_path_factory.mktemp("tiny") / "base"
    cfg = load_config(REPO / "pipelines/configs/demo.yaml", [f"model.checkpoint={path}", "adapter.r=8"])
    no_warmups = {"warmup_steps": 0, "vision_warmup_steps": 0, "caption_warmup_steps": 0}
    save_tiny_checkpoint(cfg.model.tiny.model_copy(update=no_warmups), path, seed=0)
    return cfg


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB tmpfs of this test's own (`resize_mount` shrinks it); skipped where mounting is not permitted."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def resize_mount(mount: Path, size_bytes: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size_bytes}", str(mount)], check=True)
