"""Row validation, CLIP transform, bad-row budget, collate, and streaming through Ray Data end to end."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import S3Endpoint
from PIL import Image
from transformers import CLIPImageProcessor

from components import storage
from components.config import DuetConfig
from components.data.conversation import IGNORE_INDEX
from components.data.prepare import prepare
from components.data.quality import _Monitor
from components.data.records import BadRecord, decode_image, parse_row, to_rgb
from components.data.shards import Manifest, ShardInfo, TarShardWriter, encode_record, read_manifest
from components.data.synthetic import SyntheticShapes
from components.data.transform import ImageSpec, load_image_spec, normalize, resize_and_crop
from components.layout import split_uri

NUM_VISUAL = 64  # tiny model: (64 / 8) ** 2


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def row(meta: dict | bytes | None, key: str = "000000001", **members: bytes) -> dict:
    out: dict = {"__key__": key, "__url__": "bucket/x/shard-00000.tar", **members}
    if meta is not None:
        out["json"] = meta if isinstance(meta, bytes) else json.dumps(meta).encode()
    return out


GOOD_META = {"id": "a", "images": ["png"],
             "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]}


# ---------------------------------------------------------------- records


@pytest.mark.parametrize(
    ("mode", "make"),
    [
        ("CMYK", lambda: Image.new("CMYK", (4, 4), (0, 255, 255, 0))),
        ("P", lambda: Image.new("RGB", (4, 4), (255, 0, 0)).convert("P")),
        ("L", lambda: Image.new("L", (4, 4), 200)),
        ("1", lambda: Image.new("1", (4, 4), 1)),
    ],
)
def test_opaque_modes_convert_to_rgb(mode: str, make) -> None:
    image = to_rgb(make())
    assert image.mode == "RGB" and image.size == (4, 4)


def test_transparency_is_composited_on_white() -> None:
    rgba = Image.new("RGBA", (2, 1), (255, 0, 0, 255))
    rgba.putpixel((1, 0), (0, 0, 0, 0))
    assert list(to_rgb(rgba).getdata()) == [(255, 0, 0), (255, 255, 255)]
    la = Image.new("LA", (1, 1), (0, 0))
    assert to_rgb(la).getpixel((0, 0)) == (255, 255, 255)
    palette = Image.new("P", (1, 1), 0)
    palette.info["transparency"] = 0
    assert to_rgb(palette).getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_grey_scales_to_eight_bits() -> None:
    deep = Image.fromarray(np.array([[0, 65535, 32896]], dtype=np.uint16))
    decoded = decode_image(encoded(deep), 10_000)
    assert decoded.mode == "RGB"
    assert [decoded.getpixel((x, 0))[0] for x in range(3)] == [0, 255, 128]


@pytest.mark.parametrize(
    "data",
    [b"", b"not an image at all", encoded(Image.new("RGB", (32, 32), (1, 2, 3)))[:60],
     encoded(Image.new("RGB", (64, 64), (9, 9, 9)), "JPEG")[:200]],
    ids=["zero-byte", "garbage", "truncated-png", "truncated-jpeg"],
)
def test_undecodable_images_are_corrupt(data: bytes) -> None:
    with pytest.raises(BadRecord) as info:
        decode_image(data, 10_000)
    assert info.value.reason == "corrupt_image"


def test_decompression_bomb_is_refused_before_decoding() -> None:
    with pytest.raises(BadRecord, match="pixel limit|decompression bomb") as info:
        decode_image(encoded(Image.new("L", (200, 200))), 10_000)
    assert info.value.reason == "corrupt_image"
    with pytest.raises(BadRecord, match="decompression bomb|pixel limit"):  # PIL's own guard, far above the limit
        decode_image(encoded(Image.new("L", (400, 400))), 10_000)
    assert Image.MAX_IMAGE_PIXELS != 10_000  # the process-wide PIL limit is restored afterwards


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (row(b"{not json", png=b"x"), "bad_json"),
        (row(b"\xff\xfe", png=b"x"), "bad_json"),
        (row(b"[1, 2]", png=b"x"), "bad_json"),
        (row(None, png=b"x"), "missing_field"),
        (row({"id": "a", "images": ["png"]}, png=b"x"), "missing_field"),
        (row(GOOD_META), "missing_field"),
        (row(GOOD_META, png=b""), "corrupt_image"),
        (row(GOOD_META, key="../evil", png=b"x"), "path_traversal"),
        (row(GOOD_META, key="/etc/passwd", png=b"x"), "path_traversal"),
        (row({**GOOD_META, "images": ["../../etc/passwd"]}, png=b"x"), "path_traversal"),
    ],
)
def test_row_validation_reasons(raw: dict, reason: str) -> None:
    with pytest.raises(BadRecord) as info:
        parse_row(raw)
    assert info.value.reason == reason


def test_good_row_keeps_images_in_placeholder_order() -> None:
    meta = {**GOOD_META, "images": ["0.png", "1.jpg"]}
    sample = parse_row(row(meta, **{"0.png": b"first", "1.jpg": b"second", "json_extra": b"ignored"}))
    assert sample.images == [b"first", b"second"] and sample.key == "000000001"


# ---------------------------------------------------------------- image transform


def test_transform_matches_clip_image_processor(tiny_processor_dir: str) -> None:
    spec = load_image_spec(tiny_processor_dir, pad_to_square=False)
    processor = CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64},
                                   image_mean=list(spec.mean), image_std=list(spec.std))
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in [(90, 150), (64, 40)]]
    reference = processor(images=images, return_tensors="np")["pixel_values"]
    mine = normalize(np.stack([resize_and_crop(im, spec) for im in images]), spec)
    assert mine.shape == reference.shape == (2, 3, 64, 64) and mine.dtype == np.float32
    np.testing.assert_allclose(mine, reference, atol=1e-5)


def test_llava_pad_fills_with_the_mean_colour() -> None:
    spec = ImageSpec(shortest_edge=8, resize_hw=None, crop_hw=(8, 8), mean=(0.5, 0.25, 0.0), std=(1.0, 1.0, 1.0))
    tall = Image.new("RGB", (2, 8), (255, 255, 255))
    out = resize_and_crop(tall, spec)
    assert out.shape == (8, 8, 3)
    assert tuple(out[4, 0]) == (127, 63, 0) and tuple(out[4, 4]) == (255, 255, 255)


# ---------------------------------------------------------------- bad-row budget


def test_monitor_budget_dedupes_and_names_the_worst_shard() -> None:
    monitor = _Monitor("train", total=100, max_bad_fraction=0.03)  # budget: 3 bad rows
    assert monitor.report({"shard-00000.tar": 50}, [("shard-00000.tar", "k1", "bad_json")]) is None
    assert monitor.report({}, [("shard-00001.tar", "k2", "corrupt_image"), ("shard-00001.tar", "k3", "too_long")]) is None
    assert monitor.report({}, [("shard-00001.tar", "k2", "corrupt_image")]) is None  # same row again: not counted
    message = monitor.report({}, [("shard-00001.tar", "k4", "corrupt_image")])
    assert message is not None
    assert "Worst shard: shard-00001.tar with 3 bad ({'corrupt_image': 2, 'too_long': 1})" in message
    assert "{'bad_json': 1, 'corrupt_image': 2, 'too_long': 1}" in message and "max_bad_fraction=0.03" in message
    report = monitor.snapshot()
    assert report.num_bad == 4 and report.rows_seen == 50 and report.failure == message


def test_zero_threshold_fails_on_the_first_bad_row() -> None:
    assert _Monitor("t", 10, 0.0).report({}, [("s", "k", "bad_json")]) is not None


# ---------------------------------------------------------------- per-worker streams


def test_keep_positions_gives_every_row_to_exactly_one_worker() -> None:
    import pandas as pd

    from components.data.preprocessors import keep_positions

    keys = [f"{i:09d}" for i in range(10)] + ["../evil", "g0001"]
    batch = pd.DataFrame({"__key__": keys, "json": [b"{}"] * len(keys)})
    parts = [keep_positions(batch, index, 3)["__key__"].tolist() for index in range(3)]
    assert sorted(k for part in parts for k in part) == sorted(keys)
    assert parts[0][:4] == ["000000000", "000000003", "000000006", "000000009"]


# ---------------------------------------------------------------- collate


def test_collate_pads_and_concatenates_images() -> None:
    from components.data.dataset import collate

    batch = {
        "input_ids": np.array([np.array([5, 6, 7]), np.array([8])], dtype=object),
        "labels": np.array([np.array([-100, 6, 7]), np.array([8])], dtype=object),
        "pixel_values": np.array([np.ones((2, 3, 4, 4), np.float32), np.zeros((0, 3, 4, 4), np.float32)],
                                 dtype=object),
    }
    out = collate(batch, pad_token_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["pixel_values"].shape == (2, 3, 4, 4) and out["pixel_values"].dtype == torch.float32


# ---------------------------------------------------------------- streaming with Ray (slow)


@pytest.fixture(scope="module")
def ray_cluster(s3_endpoint: S3Endpoint) -> Iterator[None]:
    """Local Ray, started after the S3 fixture so workers inherit its credentials."""
    import ray

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def check_rows(batch: dict[str, torch.Tensor], image_token_id: int) -> None:
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape == labels.shape == mask.shape
    labelled = labels != IGNORE_INDEX
    assert torch.equal(labels[labelled], ids[labelled]) and labelled.any(dim=1).all()
    assert not (labelled & (mask == 0)).any()
    images_per_row = (ids == image_token_id).sum(dim=1)
    assert torch.all(images_per_row % NUM_VISUAL == 0)
    assert batch["pixel_values"].shape == (int(images_per_row.sum()) // NUM_VISUAL, 3, 64, 64)


@pytest.mark.slow
def test_streams_synthetic_split_from_s3_into_torch_batches(
    ray_cluster: None, s3_endpoint: S3Endpoint, s3_bucket: str, tiny_processor_dir: str
) -> None:
    from transformers import AutoTokenizer

    from components.data.dataset import build_dataset, make_collate, quality_report

    cfg = DuetConfig.model_validate({
        "storage": {"endpoint_url": s3_endpoint.url, "region": "us-east-1"},
        "data": {"root": f"{s3_bucket}/datasets", "num_records": 48, "caption_records": 8, "records_per_shard": 20},
        "model": {"max_length": 320},
    })
    prepare(cfg.data, cfg.storage)
    uri = split_uri(cfg.data, "train")
    manifest = read_manifest(uri, cfg.storage)
    remote_processor = f"{s3_bucket}/models/tiny"  # the model directory may live in object storage too
    storage.copy_dir(tiny_processor_dir, remote_processor, cfg.storage)
    dataset = build_dataset(uri, cfg, remote_processor, NUM_VISUAL)
    image_token = AutoTokenizer.from_pretrained(tiny_processor_dir).convert_tokens_to_ids("<image>")
    rows = 0
    for batch in dataset.iter_torch_batches(batch_size=8, collate_fn=make_collate(remote_processor, cfg.storage)):
        check_rows(batch, image_token)
        rows += batch["input_ids"].shape[0]
    assert rows == manifest.count == 44
    report = quality_report(uri, cfg)
    assert report is not None and report.rows_seen == 44 and report.num_bad == 0


def _planted_split(root: Path) -> tuple[str, dict[str, int], int]:
    """A clean shard (incl. multi-image and text-only rows), one with every kind of bad row, one all bad."""
    gen = SyntheticShapes(0, 64)
    good_png = gen.png(0)
    clean = [gen.record(i) for i in range(20)]
    clean.append({"id": "multi", "images": [("png", good_png), ("jpg", encoded(Image.new("RGB", (80, 50)), "JPEG"))],
                  "conversations": [{"from": "human", "value": "<image> and <image>"}, {"from": "gpt", "value": "two"}]})
    clean.append({"id": "text", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]})

    def meta(**changes: object) -> bytes:
        return json.dumps({**GOOD_META, **changes}).encode()

    bad_rows: list[tuple[str, dict[str, bytes]]] = [
        ("b00", {"json": meta(), "png": b""}),
        ("b01", {"json": meta(), "png": good_png[:80]}),
        ("b02", {"json": meta(), "png": b"garbage bytes"}),
        ("b03", {"json": meta(), "png": encoded(Image.new("L", (300, 300)))}),
        ("b04", {"json": b"{broken", "png": good_png}),
        ("b05", {"png": good_png}),
        ("b06", {"json": json.dumps({"id": "x", "images": ["png"]}).encode(), "png": good_png}),
        ("b07", {"json": meta(images=["png", "0.jpg"]), "png": good_png}),
        ("b08", {"json": meta(conversations=[{"from": "human", "value": "<image>"}, {"from": "gpt", "value": ""}]),
                 "png": good_png}),
        ("b09", {"json": meta(conversations=[{"from": "human", "value": "<image>"},
                                             {"from": "gpt", "value": "word " * 400}]), "png": good_png}),
        ("../b10", {"json": meta(), "png": good_png}),
        ("b11", {"json": meta(images=["../../etc/passwd"]), "png": good_png}),
        ("b12", {"json": meta(conversations=[{"from": "human", "value": "no placeholder"},
                                             {"from": "gpt", "value": "a"}]), "png": good_png}),
        ("b13", {"json": meta(conversations=[{"from": "gpt", "value": "<image>"}, {"from": "human", "value": "a"}]),
                 "png": good_png}),
    ]
    expected = {"corrupt_image": 4, "bad_json": 1, "missing_field": 3, "empty_answer": 1, "too_long": 1,
                "path_traversal": 2, "image_mismatch": 1, "bad_conversation": 1}
    dirty = [gen.record(100 + i) for i in range(5)]
    # A whole shard of undecodable images: every image-stage batch over it comes out empty.
    hopeless = [(f"h{n:03d}", {"json": meta(), "png": b"not a png"}) for n in range(40)]
    expected["corrupt_image"] += len(hopeless)
    root.mkdir(parents=True, exist_ok=True)
    shards = []
    for index, (good, bad) in enumerate([(clean, []), (dirty, bad_rows), ([], hopeless)]):
        path = root / f"shard-{index:05d}.tar"
        writer = TarShardWriter(path)
        for n, record in enumerate(good):
            writer.add(f"g{index}{n:04d}", encode_record(record, f"g{index}{n:04d}"))
        for key, members in bad:
            for suffix in sorted(members):
                writer.add_member(f"{key}.{suffix}", members[suffix])
            writer.count += 1
        writer.close()
        data = path.read_bytes()
        shards.append(ShardInfo(path.name, writer.count, hashlib.sha256(data).hexdigest(), len(data)))
    total = sum(s.count for s in shards)
    manifest = Manifest(split="train", count=total, shards=tuple(shards), task_mix={}, source={"kind": "planted"},
                        inputs_digest="planted")
    storage.write_text(str(root / "manifest.json"), manifest.to_json())
    return str(root), expected, len(clean) + len(dirty)


@pytest.mark.slow
def test_planted_bad_rows_are_skipped_counted_then_fatal_past_the_threshold(
    ray_cluster: None, tmp_path: Path, tiny_processor_dir: str
) -> None:
    from components.data.dataset import build_dataset, make_collate, quality_report

    uri, expected, good = _planted_split(tmp_path / "planted")
    lenient = DuetConfig.model_validate({"data": {"max_bad_fraction": 1.0, "max_image_pixels": 50_000},
                                             "model": {"max_length": 400}})
    collate_fn = make_collate(tiny_processor_dir)
    rows = images = 0
    for batch in build_dataset(uri, lenient, tiny_processor_dir, NUM_VISUAL).iter_torch_batches(
            batch_size=16, collate_fn=collate_fn):
        rows += batch["input_ids"].shape[0]
        images += batch["pixel_values"].shape[0]
    assert rows == good and images == good  # the text-only row has no image, the multi-image row two
    report = quality_report(uri, lenient)
    assert report.bad == dict(sorted(expected.items()))
    assert report.by_shard.keys() == {"shard-00001.tar", "shard-00002.tar"}
    assert report.rows_seen == good + sum(expected.values())

    strict = lenient.model_copy(update={"data": lenient.data.model_copy(update={"max_bad_fraction": 0.1})})
    with pytest.raises(Exception) as info:
        for _ in build_dataset(uri, strict, tiny_processor_dir, NUM_VISUAL).iter_torch_batches(
                batch_size=16, collate_fn=collate_fn):
            pass
    message = str(info.value)
    # Which dirty shard is worst when the budget runs out depends on which batches finished first.
    assert re.search(r"Worst shard: shard-0000[12]\.tar with \d+ bad \(\{", message)
    assert "max_bad_fraction=0.1" in message and re.search(r"Bad rows by reason: \{'\w+': \d+", message)
