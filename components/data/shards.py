"""WebDataset tar shards with a manifest: deterministic writing, validation, and the dataset version.

Layout of one split (``{data.root}/{data.name}/{split}/``)::

    shard-00000.tar   KEY.png (or KEY.jpg, ...; multi-image: KEY.0.png, KEY.1.png) + KEY.json
    shard-00001.tar   ...
    manifest.json     count, per-shard name/count/sha256/size, schema version, task mix, source, inputs digest

``KEY.json`` holds ``id``, ``task``, ``conversations`` (LLaVA ``from: human|gpt`` turns),
``answer_fields`` (structured ground truth for evaluation) and ``images``: the
member suffixes of the record's images in placeholder order (``[]`` for text-only
records). Keys are the record's position in the split (``000000042``): they never
contain a dot, which WebDataset readers use to split key from suffix.

Tar members are written with fixed metadata (mtime, uid/gid, names, mode) in sorted
order, so the same input gives byte-identical shards. Shards are written
atomically one by one and the manifest last; an existing manifest is removed
before the first shard is replaced. So a crash never leaves a manifest that
points at missing or half-written shards. The manifest's ``digest`` (sha256 of its
canonical JSON) is the dataset version recorded in lineage.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import tempfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from components import storage
from components.config import StorageSection
from components.errors import DuetError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
IMAGE_PLACEHOLDER = "<image>"
IMAGE_EXTENSIONS = ("jpg", "png", "webp", "gif", "bmp", "tiff")
ROLES = ("human", "gpt")
# Fixed tar metadata: 2000-01-01T00:00:00Z.
_MTIME = 946684800
_SHARD_NAME = re.compile(r"^shard-\d{5,}\.tar$")
_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


class RecordError(DuetError, ValueError):
    """A source record that cannot be written; the message names the record id, the field and the fix."""


class ManifestError(DuetError, ValueError):
    """A missing, unreadable or inconsistent manifest."""


@dataclass(frozen=True)
class ShardInfo:
    name: str
    count: int
    sha256: str
    size: int


@dataclass(frozen=True)
class Manifest:
    """What a split holds; ``digest`` is the dataset version."""

    split: str
    count: int
    shards: tuple[ShardInfo, ...]
    task_mix: dict[str, int]
    source: dict[str, Any]
    inputs_digest: str
    schema_version: int = SCHEMA_VERSION
    num_images: int = 0
    text_only: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["shards"] = [asdict(s) for s in self.shards]
        return out

    def to_json(self) -> str:
        """Canonical form: sorted keys, no whitespace variation."""
        return json.dumps(self.to_dict(), sort_keys=True, indent=1, ensure_ascii=True) + "\n"

    @property
    def digest(self) -> str:
        return hashlib.sha256(
            json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
        ).hexdigest()

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> Manifest:
        try:
            version = int(data["schema_version"])
            if version > SCHEMA_VERSION:
                raise ManifestError(
                    f"{where}: schema_version {version} is newer than this code supports ({SCHEMA_VERSION}); "
                    "upgrade duet or re-run pipelines/prepare_data.py"
                )
            shards = tuple(ShardInfo(**s) for s in data["shards"])
            manifest = cls(
                split=str(data["split"]), count=int(data["count"]), shards=shards,
                task_mix={str(k): int(v) for k, v in data["task_mix"].items()}, source=dict(data["source"]),
                inputs_digest=str(data["inputs_digest"]), schema_version=version,
                num_images=int(data.get("num_images", 0)), text_only=int(data.get("text_only", 0)),
                extra=dict(data.get("extra", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, ManifestError):
                raise
            raise ManifestError(f"{where}: malformed manifest ({exc!r}); re-run pipelines/prepare_data.py") from None
        for shard in manifest.shards:
            if not _SHARD_NAME.match(shard.name):
                raise ManifestError(f"{where}: shard name {shard.name!r} is not of the form shard-NNNNN.tar")
        if sum(s.count for s in manifest.shards) != manifest.count:
            raise ManifestError(f"{where}: shard counts do not add up to count={manifest.count}")
        return manifest


def manifest_uri(split_uri: str) -> str:
    """The manifest of a split directory (a URI that already names manifest.json is kept)."""
    return split_uri if split_uri.rstrip("/").endswith(MANIFEST_NAME) else storage.join(split_uri, MANIFEST_NAME)


def split_dir(split_uri: str) -> str:
    """The split directory of a split URI or of its manifest URI."""
    uri = split_uri.rstrip("/")
    return uri[: -len(MANIFEST_NAME) - 1] if uri.endswith("/" + MANIFEST_NAME) else uri


def read_manifest(split_uri: str, cfg: StorageSection | None = None) -> Manifest:
    """Load and check a split's manifest; a missing one says how to create it."""
    uri = manifest_uri(split_uri)
    try:
        text = storage.read_text(uri, cfg)
    except FileNotFoundError:
        raise ManifestError(
            f"no {MANIFEST_NAME} at {uri}: the split was never prepared or its preparation did not finish; "
            "run pipelines/prepare_data.py for it"
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{uri} is not valid JSON ({exc}); re-run pipelines/prepare_data.py") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{uri} must hold a JSON object")
    return Manifest.from_dict(data, uri)


def shard_uris(split_uri: str, manifest: Manifest) -> list[str]:
    """URIs of the manifest's shards, in manifest order."""
    base = split_dir(split_uri)
    return [storage.join(base, s.name) for s in manifest.shards]


def shards_present(split_uri: str, manifest: Manifest, cfg: StorageSection | None = None) -> bool:
    """True when every shard the manifest lists exists with the listed size (cheap: no hashing)."""
    return all(
        storage.file_size(uri, cfg) == shard.size for uri, shard in zip(shard_uris(split_uri, manifest), manifest.shards)
    )


# ---------------------------------------------------------------- record validation


def _placeholders(conversations: list[dict]) -> int:
    return sum(turn["value"].count(IMAGE_PLACEHOLDER) for turn in conversations)


def check_conversations(conversations: Any, where: str) -> list[dict]:
    """Conversations must alternate human/gpt turns starting with human, with string values."""
    if not isinstance(conversations, list) or not conversations:
        raise RecordError(f"{where}: 'conversations' must be a non-empty list of {{from, value}} turns")
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or turn.get("from") not in ROLES:
            raise RecordError(
                f"{where}: conversations[{i}] must be {{'from': 'human'|'gpt', 'value': str}}, got {turn!r:.120}"
            )
        expected = ROLES[i % 2]
        if turn["from"] != expected:
            raise RecordError(f"{where}: conversations[{i}] is from {turn['from']!r}, expected {expected!r} "
                              "(turns alternate human, gpt, starting with human)")
        if turn["from"] == "gpt" and not turn["value"].strip():
            raise RecordError(f"{where}: conversations[{i}] (gpt) has an empty answer")
        if turn["from"] == "gpt" and IMAGE_PLACEHOLDER in turn["value"]:  # the reader would skip it every time
            raise RecordError(f"{where}: conversations[{i}] (gpt) contains {IMAGE_PLACEHOLDER!r}; "
                              "image placeholders belong in the human turns")
    if conversations[-1]["from"] != "gpt":
        raise RecordError(f"{where}: the last turn must be the assistant's ('gpt') answer")
    return conversations


def _image_ext(ext: str, where: str) -> str:
    ext = ext.lower().lstrip(".")
    ext = {"jpeg": "jpg", "tif": "tiff"}.get(ext, ext)
    if ext not in IMAGE_EXTENSIONS:
        raise RecordError(f"{where}: image type {ext!r} is not supported; use one of {', '.join(IMAGE_EXTENSIONS)}")
    return ext


def encode_record(record: dict, key: str) -> dict[str, bytes]:
    """A validated record as tar members (suffix -> bytes); raises RecordError naming the record and field."""
    rid = record.get("id")
    where = f"record {rid!r}" if rid is not None else f"record at position {key}"
    if not isinstance(rid, str | int) or str(rid) == "":
        raise RecordError(f"{where}: missing 'id' (every record needs a unique string id)")
    if not _KEY.match(key):
        raise RecordError(f"{where}: shard key {key!r} may only hold letters, digits, '_' and '-'")
    conversations = check_conversations(record.get("conversations"), where)
    images = record.get("images") or []
    if _placeholders(conversations) != len(images):
        raise RecordError(
            f"{where}: {len(images)} image(s) but {_placeholders(conversations)} '{IMAGE_PLACEHOLDER}' placeholder(s); "
            f"put exactly one '{IMAGE_PLACEHOLDER}' in the human turns per image"
        )
    members: dict[str, bytes] = {}
    suffixes = []
    for i, item in enumerate(images):
        ext, data = item
        suffix = _image_ext(ext, where) if len(images) == 1 else f"{i}.{_image_ext(ext, where)}"
        if not isinstance(data, bytes | bytearray) or not data:
            raise RecordError(f"{where}: image {i} is empty")
        members[suffix] = bytes(data)
        suffixes.append(suffix)
    meta = {k: v for k, v in record.items() if k != "images"}
    meta["id"] = str(rid)
    meta.setdefault("task", "chat")
    meta.setdefault("answer_fields", {})
    meta["images"] = suffixes
    try:
        members["json"] = json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise RecordError(f"{where}: metadata is not JSON-serialisable ({exc})") from None
    return members


# ---------------------------------------------------------------- tar writing


class TarShardWriter:
    """A deterministic WebDataset tar: fixed member metadata, members of a sample in sorted order.

    Low level (no record validation): `write_shards` is the normal entry point.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)
        self.count = 0
        self._tar = tarfile.open(self.path, mode="w", format=tarfile.PAX_FORMAT)

    def add(self, key: str, members: dict[str, bytes]) -> None:
        for suffix in sorted(members):
            self.add_member(f"{key}.{suffix}", members[suffix])
        self.count += 1

    def add_member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name=name)
        info.size = len(data)
        info.mtime = _MTIME
        info.mode = 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.type = tarfile.REGTYPE
        self._tar.addfile(info, io.BytesIO(data))

    def close(self) -> None:
        self._tar.close()


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.tar"


def write_shards(
    records: Iterable[dict],
    output_uri: str,
    *,
    split: str,
    source: dict[str, Any],
    inputs_digest: str,
    records_per_shard: int = 1000,
    cfg: StorageSection | None = None,
) -> Manifest:
    """Write records as shards under `output_uri` (a split directory), then the manifest; return it.

    A record is a dict with ``id``, ``conversations``, optional ``task`` (default
    ``chat``) and ``answer_fields``, ``images``: a list of ``(extension, bytes)``
    in placeholder order, and any further JSON-serialisable metadata.
    """
    if records_per_shard < 1:
        raise ValueError(f"records_per_shard must be >= 1, got {records_per_shard}")
    storage.delete_file(manifest_uri(output_uri), cfg)  # never leave a manifest over shards being replaced
    shards: list[ShardInfo] = []
    tasks: Counter[str] = Counter()
    num_images = text_only = 0
    with tempfile.TemporaryDirectory(prefix="duet-shards-") as tmp:
        writer: TarShardWriter | None = None
        for position, record in enumerate(records):
            key = f"{position:09d}"
            members = encode_record(record, key)
            if writer is None:
                writer = TarShardWriter(os.path.join(tmp, shard_name(len(shards))))
            writer.add(key, members)
            tasks[str(record.get("task", "chat"))] += 1
            n_images = len(record.get("images") or [])
            num_images += n_images
            text_only += n_images == 0
            if writer.count == records_per_shard:
                shards.append(_publish(writer, output_uri, cfg))
                writer = None
        if writer is not None:
            shards.append(_publish(writer, output_uri, cfg))
    count = sum(s.count for s in shards)
    if count == 0:
        raise RecordError(f"split {split!r} got no records; check the input and the split fractions")
    manifest = Manifest(
        split=split, count=count, shards=tuple(shards), task_mix=dict(sorted(tasks.items())), source=source,
        inputs_digest=inputs_digest, num_images=num_images, text_only=text_only,
    )
    _remove_stale_shards(output_uri, manifest, cfg)
    storage.write_text(manifest_uri(output_uri), manifest.to_json(), cfg)
    return manifest


def _publish(writer: TarShardWriter, output_uri: str, cfg: StorageSection | None) -> ShardInfo:
    """Close a local shard, hash it, upload it atomically next to its siblings, and describe it."""
    writer.close()
    name = os.path.basename(writer.path)
    info = ShardInfo(name=name, count=writer.count, sha256=_sha256_file(writer.path), size=os.path.getsize(writer.path))
    storage.upload_file(writer.path, storage.join(output_uri, name), cfg)
    os.unlink(writer.path)
    return info


def _remove_stale_shards(output_uri: str, manifest: Manifest, cfg: StorageSection | None) -> None:
    """Delete shard files of an earlier, larger version that the new manifest no longer lists."""
    keep = {s.name for s in manifest.shards}
    for uri in storage.list_files(output_uri, suffix=".tar", cfg=cfg):
        name = uri.rsplit("/", 1)[-1]
        if _SHARD_NAME.match(name) and name not in keep and uri.rsplit("/", 1)[0] == output_uri.rstrip("/"):
            storage.delete_file(uri, cfg)
