"""WebDataset shards: generic readability, byte-identical rewrites, manifest-last crash safety."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections import defaultdict
from pathlib import Path

import pytest
from conftest import S3Endpoint

from components import storage
from components.data.shards import (
    Manifest,
    ManifestError,
    RecordError,
    read_manifest,
    shard_uris,
    write_shards,
)
from components.data.synthetic import SyntheticShapes


def read_tar_generic(data: bytes) -> dict[str, dict[str, bytes]]:
    """A reader that knows nothing of this project: group tar members by the name before the first dot."""
    samples: dict[str, dict[str, bytes]] = defaultdict(dict)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar.getmembers():
            key, _, suffix = member.name.partition(".")
            samples[key][suffix] = tar.extractfile(member).read()
    return dict(samples)


def records(n: int, seed: int = 0) -> list[dict]:
    out = list(SyntheticShapes(seed, 32).records(0, n))
    out.append({  # multi-image
        "id": "multi", "task": "chat", "images": [("png", out[0]["images"][0][1]), ("jpeg", b"\xff\xd8fake")],
        "conversations": [{"from": "human", "value": "<image> vs <image>"}, {"from": "gpt", "value": "same"}],
    })
    out.append({"id": "text", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]})
    return out


def write(uri: str, recs: list[dict], cfg=None, per_shard: int = 4) -> Manifest:
    return write_shards(recs, uri, split="train", source={"kind": "test"}, inputs_digest="x",
                        records_per_shard=per_shard, cfg=cfg)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_every_record_reads_back_with_a_generic_reader(where: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    cfg, root = None, str(tmp_path / "split")
    if where == "s3":
        cfg = request.getfixturevalue("s3_endpoint").storage_config()
        root = request.getfixturevalue("s3_bucket") + "/ds/train"
    recs = records(9)
    manifest = write(root, recs, cfg)
    assert manifest.count == 11 and [s.count for s in manifest.shards] == [4, 4, 3]
    assert manifest.num_images == 11 and manifest.text_only == 1
    assert manifest.task_mix == {"chat": 2, "description": 3, "items": 3, "numeric": 3}
    assert read_manifest(root, cfg) == manifest
    seen = {}
    for uri, info in zip(shard_uris(root, manifest), manifest.shards):
        data = storage.read_bytes(uri, cfg)
        assert hashlib.sha256(data).hexdigest() == info.sha256 and len(data) == info.size
        for key, members in read_tar_generic(data).items():
            meta = json.loads(members["json"])
            assert sorted(members) == sorted(["json", *meta["images"]])
            seen[meta["id"]] = (key, meta, members)
    assert set(seen) == {r["id"] for r in recs}
    key, meta, members = seen["multi"]
    assert meta["images"] == ["0.png", "1.jpg"] and members["1.jpg"] == b"\xff\xd8fake"
    assert seen["text"][1]["images"] == [] and seen["text"][1]["task"] == "chat"
    first = recs[0]
    _, meta, members = seen[first["id"]]
    assert members["png"] == first["images"][0][1]
    assert meta["conversations"] == first["conversations"] and meta["answer_fields"] == first["answer_fields"]


def test_same_input_gives_byte_identical_shards(tmp_path: Path) -> None:
    a = write(str(tmp_path / "a"), records(9))
    b = write(str(tmp_path / "b"), records(9))
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]
    assert a.digest == b.digest
    assert (tmp_path / "a" / "shard-00000.tar").read_bytes() == (tmp_path / "b" / "shard-00000.tar").read_bytes()
    c = write(str(tmp_path / "c"), records(9, seed=1))
    assert c.digest != a.digest


def test_tar_members_have_fixed_metadata_and_sorted_order(tmp_path: Path) -> None:
    write(str(tmp_path), records(3))
    with tarfile.open(tmp_path / "shard-00000.tar") as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == sorted(m.name for m in members)
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {(946684800, 0, 0, "", "", 0o644)}


def test_crash_mid_write_leaves_no_manifest(tmp_path: Path) -> None:
    root = str(tmp_path)
    write(root, records(9))

    def exploding():
        yield from records(6)
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write(root, exploding())
    with pytest.raises(ManifestError, match="prepare_data"):
        read_manifest(root)


def test_rewrite_with_fewer_records_removes_stale_shards(tmp_path: Path) -> None:
    write(str(tmp_path), records(9))
    manifest = write(str(tmp_path), records(2))
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == [s.name for s in manifest.shards] == ["shard-00000.tar"]


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, "missing 'id'"),
        ({"id": "r1", "conversations": [{"from": "gpt", "value": "a"}]}, "record 'r1'.*expected 'human'"),
        ({"id": "r2", "conversations": [{"from": "human", "value": "<image> q"}, {"from": "gpt", "value": "a"}]},
         "record 'r2': 0 image.*1 '<image>'"),
        ({"id": "r3", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": " "}]},
         "record 'r3'.*empty answer"),
        ({"id": "r4", "images": [("exe", b"x")],
          "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a"}]}, "'exe'"),
    ],
)
def test_invalid_records_are_refused_by_name(tmp_path: Path, record: dict, message: str) -> None:
    with pytest.raises(RecordError, match=message):
        write(str(tmp_path), [record])


def test_tampered_manifest_cannot_point_outside_the_split(tmp_path: Path) -> None:
    manifest = write(str(tmp_path), records(2))
    data = manifest.to_dict()
    data["shards"][0]["name"] = "../../elsewhere.tar"
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="shard-NNNNN.tar"):
        read_manifest(str(tmp_path))
    data["shards"][0]["name"] = "shard-00000.tar"
    data["schema_version"] = 99
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="newer"):
        read_manifest(str(tmp_path))


def test_s3_rewrite_is_deterministic(s3_endpoint: S3Endpoint, s3_bucket: str) -> None:
    cfg = s3_endpoint.storage_config()
    a = write(f"{s3_bucket}/a", records(5), cfg)
    b = write(f"{s3_bucket}/b", records(5), cfg)
    assert a.digest == b.digest
