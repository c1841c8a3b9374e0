"""pipelines/prepare_data.py end to end: every source format to local disk and to the S3 endpoint."""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import S3Endpoint
from PIL import Image

from components import storage
from components.config import StorageSection
from components.console import run_script
from components.data.shards import read_manifest, shard_uris
from pipelines.prepare_data import main as _main


def main(argv: list[str]) -> int:
    """The script as its command line runs it: a user error ends in a message and an exit status."""
    return run_script(lambda: _main(argv))


def png(colour: tuple[int, int, int], size: tuple[int, int] = (12, 8)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0], 3), colour, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def jpg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (10, 10), (0, 128, 255)).save(buffer, format="JPEG")
    return buffer.getvalue()


def read_split(split_uri: str, cfg: StorageSection | None) -> dict[str, tuple[dict, dict[str, bytes]]]:
    """id -> (json, members) via plain tarfile, grouping members by key."""
    manifest = read_manifest(split_uri, cfg)
    out = {}
    for uri in shard_uris(split_uri, manifest):
        grouped: dict[str, dict[str, bytes]] = {}
        with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(uri, cfg))) as tar:
            for member in tar.getmembers():
                key, _, suffix = member.name.partition(".")
                grouped.setdefault(key, {})[suffix] = tar.extractfile(member).read()
        for members in grouped.values():
            meta = json.loads(members.pop("json"))
            out[meta["id"]] = (meta, members)
    assert len(out) == manifest.count
    return out


def read_all(root: str, name: str, cfg: StorageSection | None) -> dict[str, dict]:
    splits = {}
    for split in ("caption", "train", "validation", "test"):
        uri = storage.join(root, name, split)
        if storage.exists(storage.join(uri, "manifest.json"), cfg):
            splits[split] = read_split(uri, cfg)
    return splits


@pytest.fixture
def llava_input(tmp_path: Path) -> Path:
    root = tmp_path / "llava"
    (root / "coco").mkdir(parents=True)
    (root / "coco" / "a.png").write_bytes(png((255, 0, 0)))
    (root / "coco" / "b.jpg").write_bytes(jpg())
    entries = []
    for i in range(12):
        entry = {"id": f"r{i}", "conversations": [
            {"from": "human", "value": f"question {i}"}, {"from": "gpt", "value": f"answer {i}"}]}
        if i % 3 == 0:
            entry["image"] = "coco/a.png"
            entry["conversations"][0]["value"] = "<image>\n" + entry["conversations"][0]["value"]
        elif i % 3 == 1:
            entry["image"] = ["coco/a.png", "coco/b.jpg"]
            entry["conversations"][0]["value"] = "<image> and <image>: " + entry["conversations"][0]["value"]
            entry["conversations"] += [{"from": "human", "value": "more?"}, {"from": "gpt", "value": "no"}]
        entries.append(entry)  # i % 3 == 2: text-only
    (root / "data.json").write_text(json.dumps(entries))
    captions = [{"id": f"c{i}", "image": "coco/a.png", "conversations": [
        {"from": "human", "value": "<image>"}, {"from": "gpt", "value": f"caption {i}"}]} for i in range(3)]
    (root / "captions.json").write_text(json.dumps(captions))
    return root


def fractions() -> list[str]:
    return ["--set", "data.val_fraction=0.3", "--set", "data.test_fraction=0.3"]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_llava_round_trip_with_multi_image_and_text_only(
    where: str, llava_input: Path, tmp_path: Path, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture
) -> None:
    cfg, root, extra = None, str(tmp_path / "out"), []
    if where == "s3":
        endpoint: S3Endpoint = request.getfixturevalue("s3_endpoint")
        cfg, root = endpoint.storage_config(), request.getfixturevalue("s3_bucket") + "/datasets"
        extra = ["--set", f"storage.endpoint_url={endpoint.url}", "--set", "storage.region=us-east-1"]
    argv = ["--source", "llava", "--input", str(llava_input / "data.json"), "--output", root,
            "--set", "data.name=mix", "--set", f"data.caption_input={llava_input / 'captions.json'}",
            *fractions(), *extra]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    splits = read_all(root, "mix", cfg)
    assert set(splits) == {"caption", "train", "validation", "test"}
    assert {rid for s in ("train", "validation", "test") for rid in splits[s]} == {f"r{i}" for i in range(12)}
    everything = {rid: v for s in splits.values() for rid, v in s.items()}
    meta, members = everything["r0"]
    assert meta["images"] == ["png"] and members["png"] == (llava_input / "coco" / "a.png").read_bytes()
    meta, members = everything["r1"]
    assert meta["images"] == ["0.png", "1.jpg"] and members["1.jpg"] == (llava_input / "coco" / "b.jpg").read_bytes()
    assert len(meta["conversations"]) == 4 and meta["answer_fields"] == {"reference": "no"}
    meta, members = everything["r2"]
    assert meta["images"] == [] and members == {}
    assert {m["task"] for m, _ in splits["caption"].values()} == {"caption"}
    for split in splits:
        digest = read_manifest(storage.join(root, "mix", split), cfg).digest
        assert f"{split}" in printed and digest in printed

    assert main(argv) == 0
    assert capsys.readouterr().out.count("reused") == 4


def test_unifood_families_keep_structured_truth(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    entries = []
    for i in range(6):
        (tmp_path / "img" / f"d{i}.jpg").write_bytes(jpg())
        entries.append({"id": f"d{i}", "image": f"img/d{i}.jpg", "ingredients": ["rice", "egg"],
                        "recipe": ["Boil the rice.", "Fry the egg."],
                        "nutrition": {"mass": 250, "cal": 380.25, "fat": 12, "protein": 20, "carb": 45}})
    entries.append({"id": "only-items", "image": "img/d0.jpg", "ingredients": ["salt"]})
    (tmp_path / "unifood.jsonl").write_text("\n".join(json.dumps(e) for e in entries))
    out = str(tmp_path / "out")
    assert main(["--source", "unifood", "--input", str(tmp_path / "unifood.jsonl"), "--output", out,
                 "--set", "data.name=food", *fractions()]) == 0
    splits = read_all(out, "food", None)
    by_id = {rid: (split, meta) for split, recs in splits.items() for rid, (meta, _) in recs.items()}
    assert len(by_id) == 6 * 3 + 1 and "only-items-description" not in by_id
    split, meta = by_id["d1-numeric"]
    assert meta["answer_fields"] == {"mass": 250.0, "cal": 380.2, "fat": 12.0, "protein": 20.0, "carb": 45.0}
    assert meta["conversations"][1]["value"] == "mass: 250.0, cal: 380.2, fat: 12.0, protein: 20.0, carb: 45.0"
    assert by_id["d1-items"][1]["answer_fields"] == {"items": ["rice", "egg"]}
    assert by_id["d1-description"][1]["conversations"][1]["value"] == "Boil the rice. Fry the egg."
    for i in range(6):  # the three records of one dish never straddle splits
        assert len({by_id[f"d{i}-{t}"][0] for t in ("items", "description", "numeric")}) == 1


@pytest.mark.parametrize("where", ["local", "s3"])
def test_synthetic_same_seed_gives_identical_shards(
    where: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    cfg, root, extra = None, str(tmp_path), []
    if where == "s3":
        endpoint: S3Endpoint = request.getfixturevalue("s3_endpoint")
        cfg, root = endpoint.storage_config(), request.getfixturevalue("s3_bucket")
        extra = ["--set", f"storage.endpoint_url={endpoint.url}"]
    common = ["--num-records", "60", "--seed", "5", "--set", "data.records_per_shard=25",
              "--set", "data.caption_records=30", "--set", "data.image_size=32", *extra]
    assert main([*common, "--output", storage.join(root, "one")]) == 0
    assert main([*common, "--output", storage.join(root, "two")]) == 0
    for split, count in {"caption": 30, "train": 54, "validation": 3, "test": 3}.items():
        a = read_manifest(storage.join(root, "one", "synthetic", split), cfg)
        b = read_manifest(storage.join(root, "two", "synthetic", split), cfg)
        assert a.count == count
        assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards] and a.digest == b.digest
    recs = read_split(storage.join(root, "one", "synthetic", "train"), cfg)
    assert {m["task"] for m, _ in recs.values()} == {"items", "description", "numeric"}


def test_changed_seed_rewrites_instead_of_reusing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    common = ["--output", str(tmp_path), "--num-records", "20", "--set", "data.image_size=32"]
    assert main([*common, "--seed", "1"]) == 0
    first = read_manifest(str(tmp_path / "synthetic" / "train")).digest
    capsys.readouterr()
    assert main([*common, "--seed", "2"]) == 0
    assert "reused" not in capsys.readouterr().out
    assert read_manifest(str(tmp_path / "synthetic" / "train")).digest != first


@pytest.mark.parametrize(
    ("image", "message"),
    [
        ("coco/missing.png", "record 'bad'.*'coco/missing.png' not found"),
        ("../../etc/passwd", "record 'bad'.*'../../etc/passwd' escapes the image root"),
        ("/etc/hostname", "record 'bad'.*'/etc/hostname' escapes the image root"),
    ],
)
def test_bad_image_paths_fail_naming_record_and_file(
    llava_input: Path, tmp_path: Path, capsys: pytest.CaptureFixture, image: str, message: str
) -> None:
    entries = json.loads((llava_input / "data.json").read_text())
    entries.append({"id": "bad", "image": image, "conversations": [
        {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}]})
    (llava_input / "data.json").write_text(json.dumps(entries))
    out = tmp_path / "out"
    rc = main(["--source", "llava", "--input", str(llava_input / "data.json"), "--output", str(out),
               "--set", "data.val_fraction=0", "--set", "data.test_fraction=0"])
    assert rc == 1
    assert re.search(message, capsys.readouterr().err)
    assert not (out / "synthetic" / "train" / "manifest.json").exists()


def test_absolute_path_inside_the_image_root_is_allowed(llava_input: Path, tmp_path: Path) -> None:
    entries = [{"id": "abs", "image": str(llava_input / "coco" / "a.png"), "conversations": [
        {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}]}]
    (llava_input / "abs.json").write_text(json.dumps(entries))
    assert main(["--source", "llava", "--input", str(llava_input / "abs.json"), "--output", str(tmp_path / "o"),
                 "--set", "data.val_fraction=0", "--set", "data.test_fraction=0"]) == 0


def test_input_flag_with_synthetic_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["--source", "synthetic", "--input", "x.json", "--output", str(tmp_path)]) == 2
    assert "--input is not used" in capsys.readouterr().err


def test_parallel_reads_keep_input_order_and_raise_the_first_error() -> None:
    import time

    from components.data.sources import ordered_map

    def slow_square(x: int) -> int:
        time.sleep(0.002 * (10 - x))  # early items finish last
        if x == 7:
            raise ValueError("item 7")
        return x * x

    out = []
    with pytest.raises(ValueError, match="item 7"):
        for value in ordered_map(slow_square, range(10), threads=4, window=3):
            out.append(value)
    assert out == [x * x for x in range(7)]
