"""URI resolution and file operations on local disk and on a real S3 endpoint (moto on 127.0.0.1)."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from conftest import FAKE_AWS_ENV, S3Endpoint, free_port

from components import storage
from components.config import StorageSection


def test_resolve_s3_uses_endpoint_override_and_scheme(s3_endpoint: S3Endpoint) -> None:
    fs, path = storage.resolve("s3://my-bucket/some/prefix/", s3_endpoint.storage_config())
    assert isinstance(fs, pafs.S3FileSystem)
    assert path == "my-bucket/some/prefix"


def test_resolve_local_forms(tmp_path: Path) -> None:
    for uri in (str(tmp_path / "a"), f"file://{tmp_path}/a"):
        fs, path = storage.resolve(uri)
        assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "a")
    fs, path = storage.resolve("relative/dir")
    assert path == os.path.abspath("relative/dir")


@pytest.mark.parametrize("uri", ["gs://bucket/x", "hdfs://host/x", "s3:///no-bucket", ""])
def test_resolve_refuses_unsupported(uri: str) -> None:
    with pytest.raises(ValueError, match="s3://|URI|bucket"):
        storage.resolve(uri)


def test_bad_endpoint_scheme_is_refused() -> None:
    with pytest.raises(ValueError, match="storage.endpoint_url"):
        storage.resolve("s3://b/x", StorageSection(endpoint_url="ftp://127.0.0.1:1"))


def test_endpoint_env_variable_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    assert storage.endpoint_url(StorageSection()) == "http://127.0.0.1:9"
    assert storage.endpoint_url(StorageSection(endpoint_url="http://127.0.0.1:10")) == "http://127.0.0.1:10"


def test_join_keeps_scheme() -> None:
    assert storage.join("s3://b/x/", "y", "/z.tar") == "s3://b/x/y/z.tar"
    assert storage.join("/data", "a") == "/data/a"


@pytest.mark.parametrize("where", ["local", "s3"])
def test_round_trip_list_copy_download(where: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if where == "s3":
        endpoint: S3Endpoint = request.getfixturevalue("s3_endpoint")
        cfg: StorageSection | None = endpoint.storage_config()
        root = request.getfixturevalue("s3_bucket") + "/run"
    else:
        cfg, root = None, str(tmp_path / "store")
    storage.write_text(storage.join(root, "a.txt"), "hello", cfg)
    storage.write_bytes(storage.join(root, "sub", "b.bin"), b"\x00\x01", cfg)
    assert storage.read_text(storage.join(root, "a.txt"), cfg) == "hello"
    assert storage.exists(storage.join(root, "sub", "b.bin"), cfg)
    assert not storage.exists(storage.join(root, "missing"), cfg)
    assert storage.list_files(root, cfg=cfg) == [storage.join(root, "a.txt"), storage.join(root, "sub/b.bin")]
    assert storage.list_files(root, suffix=".bin", cfg=cfg) == [storage.join(root, "sub/b.bin")]
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        storage.read_bytes(storage.join(root, "missing.txt"), cfg)

    local = tmp_path / "ckpt"
    (local / "nested").mkdir(parents=True)
    (local / "w.safetensors").write_bytes(b"w" * 1000)
    (local / "nested" / "cfg.json").write_text("{}")
    storage.copy_dir(local, storage.join(root, "ckpt"), cfg)
    back = storage.download_dir(storage.join(root, "ckpt"), tmp_path / "back", cfg)
    assert sorted(p.relative_to(tmp_path / "back").as_posix() for p in back) == ["nested/cfg.json", "w.safetensors"]
    assert (tmp_path / "back" / "w.safetensors").read_bytes() == b"w" * 1000


def test_local_write_is_atomic_and_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "out" / "f.bin"
    storage.write_bytes(str(target), b"one")
    storage.write_bytes(str(target), b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in target.parent.iterdir()] == ["f.bin"]


def test_retry_backs_off_then_names_endpoint() -> None:
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise OSError("connection reset")
        return "ok"

    assert storage.retry(flaky, what="read x", endpoint="http://e:1", attempts=3, base_delay_s=0.01) == "ok"
    with pytest.raises(storage.StorageError, match=r"read y failed after 2 attempt\(s\) against http://e:1"):
        storage.retry(lambda: (_ for _ in ()).throw(OSError("down")), what="read y", endpoint="http://e:1",
                      attempts=2, base_delay_s=0.01)
    with pytest.raises(FileNotFoundError):  # not transient: raised at once
        storage.retry(lambda: (_ for _ in ()).throw(FileNotFoundError("x")), what="r", endpoint="e", attempts=5)


def test_unreachable_endpoint_error_names_it_and_hides_credentials(s3_endpoint: S3Endpoint) -> None:
    dead = StorageSection(endpoint_url=f"http://127.0.0.1:{free_port()}", retries=0, connect_timeout_s=1)
    with pytest.raises(storage.StorageError) as info:
        storage.read_bytes("s3://some-bucket/x", dead)
    message = str(info.value)
    assert dead.endpoint_url in message
    for secret in (FAKE_AWS_ENV["AWS_SECRET_ACCESS_KEY"], FAKE_AWS_ENV["AWS_ACCESS_KEY_ID"]):
        assert secret not in message
    fs, _ = storage.resolve("s3://b", s3_endpoint.storage_config())
    assert FAKE_AWS_ENV["AWS_SECRET_ACCESS_KEY"] not in repr(fs)


def test_endpoint_userinfo_never_appears_in_messages() -> None:
    cfg = StorageSection(endpoint_url="http://user:hunter2@127.0.0.1:9")
    assert "hunter2" not in storage.describe_endpoint("s3://b/x", cfg)
    assert storage.describe_endpoint("s3://b/x", cfg) == "http://127.0.0.1:9"


def test_ensure_bucket_is_idempotent(s3_endpoint: S3Endpoint) -> None:
    cfg = s3_endpoint.storage_config()
    storage.ensure_bucket("s3://idempotent-bucket/x", cfg)
    storage.ensure_bucket("s3://idempotent-bucket/x", cfg)
    storage.write_text("s3://idempotent-bucket/x/f", "1", cfg)
    assert storage.read_text("s3://idempotent-bucket/x/f", cfg) == "1"


# ---------------------------------------------------------------- local copies of remote checkpoints


def _remote_folder(bucket: str, cfg: StorageSection, tmp_path: Path) -> tuple[str, dict[str, bytes]]:
    files = {"config.json": b'{"a": 1}', "model-00001-of-00002.safetensors": os.urandom(300_000),
             "model-00002-of-00002.safetensors": os.urandom(200_000), "sub/tokenizer.json": b"{}"}
    local = tmp_path / "src"
    for name, data in files.items():
        (local / name).parent.mkdir(parents=True, exist_ok=True)
        (local / name).write_bytes(data)
    uri = storage.join(bucket, "checkpoints", "tiny")
    storage.copy_dir(local, uri, cfg)
    return uri, files


def test_local_copy_is_complete_once_and_ignores_an_interrupted_download(
    s3_endpoint: S3Endpoint, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(storage, "cache_root", lambda: tmp_path / "cache")
    cfg = s3_endpoint.storage_config()
    uri, files = _remote_folder(s3_bucket, cfg, tmp_path)
    # What an interrupted download used to leave: config.json first (it sorts first), no shards.
    key_dirs = tmp_path / "cache" / "checkpoints"
    key_dirs.mkdir(parents=True)
    (key_dirs / ".partial-x-1").mkdir()
    (key_dirs / ".partial-x-1" / "config.json").write_bytes(files["config.json"])

    local = storage.local_copy(uri, cfg, kind="checkpoints")
    assert {p.relative_to(local).as_posix(): p.read_bytes() for p in local.rglob("*") if p.is_file()} == files
    assert storage.local_copy(uri, cfg, kind="checkpoints") == local, "downloaded once"
    assert not [p for p in key_dirs.iterdir() if p.name.startswith(".partial-") and p.name != ".partial-x-1"]

    # A folder rewritten in place is fetched again, not served stale.
    changed = tmp_path / "changed.json"
    changed.write_bytes(b'{"a": 2, "longer": true}')
    storage.upload_file(changed, storage.join(uri, "config.json"), cfg)
    again = storage.local_copy(uri, cfg, kind="checkpoints")
    assert again != local and (again / "config.json").read_bytes() == changed.read_bytes()


def test_concurrent_local_copies_download_once(
    s3_endpoint: S3Endpoint, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setattr(storage, "cache_root", lambda: tmp_path / "cache")
    cfg = s3_endpoint.storage_config()
    uri, _ = _remote_folder(s3_bucket, cfg, tmp_path)
    downloads = []
    real_copy = storage.pafs.copy_files
    monkeypatch.setattr(storage.pafs, "copy_files", lambda *a, **k: (downloads.append(1), real_copy(*a, **k))[1])
    with ThreadPoolExecutor(4) as pool:
        copies = set(pool.map(lambda _: storage.local_copy(uri, cfg), range(4)))
    assert len(copies) == 1 and len(downloads) == 1
