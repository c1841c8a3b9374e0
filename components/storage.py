"""The one place that turns a URI into a pyarrow filesystem and a path.

pyarrow does not read the AWS endpoint variables, so every S3 filesystem is
built here from `StorageSection` (endpoint override, region, retries, timeouts)
and passed explicitly to whoever does I/O (Ray Data, Ray Train, this module).
Credentials are left to the AWS SDK's default chain (environment variables,
config files, instance role): they are never passed around, printed, or put
into an error message.

Supported URIs: `s3://bucket/prefix`, `file:///abs/path`, and plain local paths
(made absolute). Anything else is refused with the list of supported schemes.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import hashlib
import logging
import os
import posixpath
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from components.config import StorageSection
from components.disk_space import storage_full
from components.errors import DISK_FULL_ERRNOS, DuetError

log = logging.getLogger(__name__)

T = TypeVar("T")

# Environment variables the AWS CLI/SDKs use for a custom endpoint; pyarrow ignores them, so read them here.
_ENDPOINT_ENV_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
_SUPPORTED = "s3://bucket/prefix, file:///absolute/path or a plain local path"
_CHUNK = 8 * 1024 * 1024


class StorageError(DuetError, OSError):
    """An I/O failure that retrying did not fix; the message names the URI and endpoint, never credentials."""


# ---------------------------------------------------------------- resolving


def is_remote(uri: str) -> bool:
    """True for object-store URIs (currently s3://)."""
    return urlsplit(uri).scheme == "s3"


def endpoint_url(cfg: StorageSection | None = None) -> str | None:
    """The S3 endpoint override in effect: the config's, else the standard AWS env variables, else None."""
    if cfg is not None and cfg.endpoint_url:
        return cfg.endpoint_url
    for name in _ENDPOINT_ENV_VARS:
        value = os.environ.get(name)
        if value:
            return value
    return None


def _public_endpoint(url: str | None) -> str:
    """Endpoint text safe for messages: user-info (user:password@) stripped."""
    if not url:
        return "AWS S3 (default endpoint)"
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}" if parts.scheme else f"{host}{port}"


def describe_endpoint(uri: str, cfg: StorageSection | None = None) -> str:
    """Where `uri` lives, for error messages: the S3 endpoint or 'local filesystem'."""
    return _public_endpoint(endpoint_url(cfg)) if is_remote(uri) else "local filesystem"


def _s3_filesystem(cfg: StorageSection, allow_bucket_creation: bool = False) -> pafs.S3FileSystem:
    return _cached_s3_filesystem(endpoint_url(cfg), cfg.region, cfg.retries, cfg.connect_timeout_s,
                                 cfg.request_timeout_s, allow_bucket_creation)


class _S3FileSystem(pafs.S3FileSystem):
    """pyarrow's S3 filesystem, pickled as the arguments duet built it from.

    pyarrow's own pickling drops the retry strategy, so in every other process (Ray Data's read tasks,
    Ray Train's controller and workers uploading checkpoints) the client fell back to pyarrow's default
    of 3 attempts per request whatever `storage.retries` said; rebuilt by `_cached_s3_filesystem` it
    keeps them (and is cached there too).
    """

    _duet_args: tuple[str | None, str | None, int, float, float, bool]

    def __reduce__(self) -> tuple[Callable[..., pafs.S3FileSystem], tuple]:
        return _cached_s3_filesystem, self._duet_args


@functools.lru_cache(maxsize=16)
def _cached_s3_filesystem(
    url: str | None, region: str | None, retries: int, connect_timeout_s: float, request_timeout_s: float,
    allow_bucket_creation: bool,
) -> pafs.S3FileSystem:
    """Building an S3 client costs ~15 ms; converting a dataset reads one object per image, so reuse them."""
    options: dict = {
        "region": region,
        "connect_timeout": connect_timeout_s,
        "request_timeout": request_timeout_s,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=retries),
        "allow_bucket_creation": allow_bucket_creation,
    }
    if url:
        parts = urlsplit(url if "://" in url else f"https://{url}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"storage.endpoint_url {_public_endpoint(url)!r} must look like http://host:port or https://host"
            )
        options["scheme"] = parts.scheme
        options["endpoint_override"] = f"{parts.hostname}:{parts.port}" if parts.port else parts.hostname
        # Path-style addressing for MinIO/moto and other non-AWS endpoints.
        options["force_virtual_addressing"] = False
        url = f"{parts.scheme}://{options['endpoint_override']}"  # what it is pickled with: no user-info
    if options["region"] is None:
        options.pop("region")
    fs = _S3FileSystem(**options)
    fs._duet_args = (url, region, retries, connect_timeout_s, request_timeout_s, allow_bucket_creation)
    return fs


def resolve(uri: str, cfg: StorageSection | None = None) -> tuple[pafs.FileSystem, str]:
    """Map a URI to (filesystem, path inside it). S3 paths are `bucket/key`; local paths are absolute."""
    if not isinstance(uri, str) or not uri:
        raise ValueError(f"expected a URI or path, got {uri!r} (use {_SUPPORTED})")
    parts = urlsplit(uri)
    if parts.scheme == "s3":
        if not parts.netloc:
            raise ValueError(f"URI {uri!r} has no bucket: expected s3://bucket/prefix")
        path = posixpath.join(parts.netloc, parts.path.lstrip("/")).rstrip("/")
        return _s3_filesystem(cfg or StorageSection()), path
    if parts.scheme == "file":
        local = parts.path if not parts.netloc else f"{parts.netloc}{parts.path}"
        return pafs.LocalFileSystem(), os.path.abspath(local)
    if parts.scheme and len(parts.scheme) > 1:  # a one-letter scheme is a Windows drive letter
        raise ValueError(f"unsupported URI scheme {parts.scheme!r} in {uri!r}: use {_SUPPORTED}")
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def join(uri: str, *parts: str) -> str:
    """Join path segments onto a URI without touching its scheme (`s3://b/x` + `y` -> `s3://b/x/y`)."""
    out = uri.rstrip("/") if uri not in ("/", "") else uri
    for part in parts:
        part = part.strip("/")
        if part:
            out = f"{out}/{part}" if out else part
    return out


# ---------------------------------------------------------------- retry


class _RetryCounter:
    """How many times `retry()` retried in this process (thread-safe; read with `retry_count()`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0

    def add(self) -> None:
        with self._lock:
            self._count += 1

    @property
    def count(self) -> int:
        return self._count


_retries = _RetryCounter()


def retry_count() -> int:
    """Whole-operation retries `retry()` made in this process since it started (never reset).

    Counted: every retry of duet's own storage layer (this module: dataset shards and manifests,
    stage artifacts, local copies, ...) in this process; the driver logs its count as the metric
    ``storage/retries`` on its pipeline run and stage runs (components/tracking/tracker.py,
    components/workflow/tracked_stage.py). Not counted, as Python never sees them: the request-level
    retries inside pyarrow's AWS SDK (``AwsStandardS3RetryStrategy``, `storage.retries` attempts per
    request), which absorb most 503 SlowDown answers and dropped connections, Ray Data's own retries of
    shard reads (``DataContext.retried_io_errors``) and Ray Train's checkpoint uploads; nor the retries
    of duet's layer in other processes (Ray workers, e.g. rank 0 writing the stage artifact).
    """
    return _retries.count


_HTTP_STATUS = re.compile(r"HTTP status (\d{3})")
# Path problems no retry fixes; pyarrow raises them as plain OSErrors carrying the errno (or, for a
# directory opened as a file, no errno and "is a directory" in the message).
_PERMANENT_ERRNOS = {errno.ENAMETOOLONG, errno.ELOOP, errno.EINVAL, errno.EISDIR, errno.ENOTDIR, errno.EACCES,
                     errno.EPERM, *DISK_FULL_ERRNOS}


def _transient(exc: BaseException) -> bool:
    """OSErrors from the filesystem are retried, except the ones that retrying cannot fix.

    pyarrow reports every S3 failure as OSError; a 4xx answer (other than 408
    timeout and 429 throttling) is the request's fault and is not retried.
    """
    if not isinstance(exc, OSError) or isinstance(
        exc, FileNotFoundError | PermissionError | IsADirectoryError | NotADirectoryError | FileExistsError
    ):
        return False
    if exc.errno in _PERMANENT_ERRNOS or "is a directory" in str(exc):
        return False
    status = _HTTP_STATUS.search(str(exc))
    return not (status and status.group(1).startswith("4") and status.group(1) not in ("408", "429"))


def retry(
    fn: Callable[[], T],
    *,
    what: str,
    endpoint: str,
    attempts: int = 3,
    base_delay_s: float = 0.5,
    max_delay_s: float = 8.0,
) -> T:
    """Call `fn`, retrying transient OSErrors with exponential back-off (base, 2*base, ...).

    Request-level retries already happen inside pyarrow's S3 client; this covers
    whole operations (a stream that drops mid-read, an endpoint that restarts, a
    request still throttled after the client's own attempts). Each retry is counted
    (`retry_count()`).
    The final error names the operation and the endpoint so a user knows which
    service to look at.
    """
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:
            if not _transient(exc):
                raise
            if attempt == attempts:
                raise StorageError(
                    f"{what} failed after {attempts} attempt(s) against {endpoint}: {exc} "
                    "(check that the endpoint is reachable and the credentials in the environment are valid)"
                ) from exc
            delay = min(max_delay_s, base_delay_s * 2 ** (attempt - 1))
            _retries.add()
            log.warning("%s failed (attempt %d/%d) against %s: %s; retrying in %.1fs",
                        what, attempt, attempts, endpoint, exc, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _with_retry(uri: str, cfg: StorageSection | None, what: str, fn: Callable[[], T]) -> T:
    endpoint = describe_endpoint(uri, cfg)
    if is_remote(uri) and endpoint_url(cfg) is None:  # a MinIO or moto user who forgot the endpoint reads this
        endpoint += "; for MinIO or another S3 API set storage.endpoint_url or AWS_ENDPOINT_URL_S3"
    return retry(fn, what=f"{what} {uri}", endpoint=endpoint)


# ---------------------------------------------------------------- files


def exists(uri: str, cfg: StorageSection | None = None) -> bool:
    """True when a file or directory is at `uri`."""
    fs, path = resolve(uri, cfg)
    info = _with_retry(uri, cfg, "stat", lambda: fs.get_file_info(path))
    return info.type != pafs.FileType.NotFound


def file_size(uri: str, cfg: StorageSection | None = None) -> int | None:
    """Size in bytes of the file at `uri`, or None when there is no file."""
    fs, path = resolve(uri, cfg)
    info = _with_retry(uri, cfg, "stat", lambda: fs.get_file_info(path))
    return info.size if info.type == pafs.FileType.File else None


def read_bytes(uri: str, cfg: StorageSection | None = None) -> bytes:
    """The whole content of one file; FileNotFoundError names the URI."""
    fs, path = resolve(uri, cfg)

    def _read() -> bytes:
        try:
            with fs.open_input_stream(path) as stream:
                return stream.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"no file at {uri}") from None

    return _with_retry(uri, cfg, "read", _read)


def read_text(uri: str, cfg: StorageSection | None = None) -> str:
    """A UTF-8 text file."""
    return read_bytes(uri, cfg).decode("utf-8")


def _atomic_local_write(path: str, write: Callable[[object], None]) -> None:
    """Write via a temp file in the same folder + os.replace, so readers never see half a file."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            raise storage_full(os.path.basename(path), path,
                               "the partial file was removed and nothing written before was touched") from None
        raise


def write_bytes(uri: str, data: bytes, cfg: StorageSection | None = None) -> None:
    """Write one file atomically (local: temp + rename; S3: a PUT is atomic per object)."""
    fs, path = resolve(uri, cfg)
    if isinstance(fs, pafs.LocalFileSystem):
        _atomic_local_write(path, lambda handle: handle.write(data))
        return

    def _put() -> None:
        with fs.open_output_stream(path) as stream:
            stream.write(data)

    _with_retry(uri, cfg, "write", _put)


def write_text(uri: str, text: str, cfg: StorageSection | None = None) -> None:
    """A UTF-8 text file, written atomically."""
    write_bytes(uri, text.encode("utf-8"), cfg)


def upload_file(local_path: str | os.PathLike[str], uri: str, cfg: StorageSection | None = None) -> None:
    """Copy one local file to `uri` atomically, streaming (no full read into memory)."""
    fs, path = resolve(uri, cfg)

    def _copy(out: object) -> None:
        with open(local_path, "rb") as src:
            while chunk := src.read(_CHUNK):
                out.write(chunk)  # type: ignore[attr-defined]

    if isinstance(fs, pafs.LocalFileSystem):
        _atomic_local_write(path, _copy)
        return

    def _put() -> None:
        with fs.open_output_stream(path) as stream:
            _copy(stream)

    _with_retry(uri, cfg, "upload to", _put)


def list_files(uri: str, suffix: str | None = None, cfg: StorageSection | None = None) -> list[str]:
    """URIs of all files under `uri` (recursive, sorted), optionally only those ending in `suffix`."""
    fs, base = resolve(uri, cfg)
    selector = pafs.FileSelector(base, recursive=True, allow_not_found=True)
    infos = _with_retry(uri, cfg, "list", lambda: fs.get_file_info(selector))
    out = []
    for info in infos:
        if info.type != pafs.FileType.File or (suffix and not info.path.endswith(suffix)):
            continue
        rel = posixpath.relpath(info.path, base) if isinstance(fs, pafs.S3FileSystem) else os.path.relpath(
            info.path, base
        ).replace(os.sep, "/")
        out.append(join(uri, rel))
    return sorted(out)


def delete_file(uri: str, cfg: StorageSection | None = None) -> None:
    """Remove one file; a missing file is not an error."""
    fs, path = resolve(uri, cfg)
    try:
        _with_retry(uri, cfg, "delete", lambda: fs.delete_file(path))
    except FileNotFoundError:
        pass


def copy_dir(local_dir: str | os.PathLike[str], uri: str, cfg: StorageSection | None = None) -> list[str]:
    """Upload every file under `local_dir` to the same relative path under `uri`; returns the URIs written."""
    root = Path(local_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"copy_dir: {str(root)!r} is not a directory")
    written = []
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        target = join(uri, file.relative_to(root).as_posix())
        upload_file(file, target, cfg)
        written.append(target)
    return written


def download_dir(uri: str, local_dir: str | os.PathLike[str], cfg: StorageSection | None = None) -> list[Path]:
    """Download every file under `uri` into `local_dir` (relative layout kept); returns the local paths."""
    sources = list_files(uri, cfg=cfg)
    if not sources:
        raise FileNotFoundError(f"download_dir: nothing under {uri}")
    root = Path(local_dir)
    prefix = uri.rstrip("/") + "/"
    written = []
    for source in sources:
        rel = source[len(prefix):]
        target = (root / rel).resolve()
        if root.resolve() not in target.parents:
            raise ValueError(f"download_dir: {source} would be written outside {root}; refusing")
        fs, path = resolve(source, cfg)

        def _fetch(out: object, fs: pafs.FileSystem = fs, path: str = path) -> None:
            with fs.open_input_stream(path) as stream:
                while chunk := stream.read(_CHUNK):
                    out.write(chunk)  # type: ignore[attr-defined]

        _with_retry(source, cfg, "download", lambda target=target, _fetch=_fetch: _atomic_local_write(
            str(target), _fetch))
        written.append(target)
    return written


# ---------------------------------------------------------------- local copies of remote folders


def _listing(uri: str, cfg: StorageSection | None) -> dict[str, tuple[int, int]]:
    """Relative path -> (size, modification time in ns) of every file under `uri`."""
    fs, base = resolve(uri, cfg)
    selector = pafs.FileSelector(base, recursive=True, allow_not_found=True)
    infos = _with_retry(uri, cfg, "list", lambda: fs.get_file_info(selector))
    return {
        posixpath.relpath(i.path, base): (int(i.size or 0), int(i.mtime_ns or 0))
        for i in infos if i.type == pafs.FileType.File
    }


@contextmanager
def _node_lock(path: Path) -> Iterator[None]:
    """An exclusive lock shared by every process on this machine (an flock'ed file next to `path`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cache_root() -> Path:
    """Where remote checkpoints and artifacts are kept on this machine (the system's temp folder)."""
    return Path(tempfile.gettempdir()) / "duet-cache"


def local_copy(uri: str, cfg: StorageSection | None = None, kind: str = "folders") -> Path:
    """A complete local copy of the folder at a remote `uri`, downloaded once per machine and version.

    The folder is fetched in parallel (`pyarrow.fs.copy_files`, threads) into a temporary folder,
    checked file by file against the remote listing (names and sizes), and only then renamed into
    place, so an interrupted download never leaves a folder that looks complete. One process per
    machine downloads (a file lock); the others wait and use its copy. The copy is keyed by the
    URI and the remote listing (sizes and modification times), so a folder rewritten in place is
    fetched again instead of served stale.
    """
    listing = _listing(uri, cfg)
    if not listing:
        raise FileNotFoundError(f"nothing under {uri} ({describe_endpoint(uri, cfg)})")
    key = hashlib.sha256(repr((uri, sorted(listing.items()))).encode()).hexdigest()[:20]
    final = cache_root() / kind / key
    if final.is_dir():
        return final
    with _node_lock(final.with_name(f".{key}.lock")):
        if final.is_dir():  # another process on this machine finished it while we waited
            return final
        partial = final.with_name(f".partial-{key}-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        fs, base = resolve(uri, cfg)
        try:
            _with_retry(uri, cfg, "download", lambda: pafs.copy_files(
                base, str(partial), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem(),
                use_threads=True,
            ))
            for rel, (size, _) in listing.items():
                got = partial / rel
                if not got.is_file() or got.stat().st_size != size:
                    raise StorageError(
                        f"download of {uri} is incomplete: {rel} has {got.stat().st_size if got.is_file() else 'no'} "
                        f"bytes, the store lists {size}; try again (nothing was kept)"
                    )
            os.rename(partial, final)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    log.info("downloaded %s (%d files) to %s", uri, len(listing), final)
    return final


def ensure_bucket(uri: str, cfg: StorageSection | None = None) -> None:
    """Create the bucket of an s3:// URI when it is missing (tests and the local demo stack)."""
    if not is_remote(uri):
        fs, path = resolve(uri, cfg)
        fs.create_dir(path, recursive=True)
        return
    bucket = urlsplit(uri).netloc
    fs = _s3_filesystem(cfg or StorageSection(), allow_bucket_creation=True)
    info = _with_retry(uri, cfg, "stat bucket", lambda: fs.get_file_info(bucket))
    if info.type == pafs.FileType.NotFound:
        _with_retry(uri, cfg, "create bucket", lambda: fs.create_dir(bucket, recursive=False))
