"""Hostile records: whatever a shard row, a source entry or an image holds, the validators end in a clean
sample, a named error (RecordError) or a counted skip reason (BadRecord / ConversationError); never another
exception, never unbounded memory.
"""

from __future__ import annotations

import io
import json
import math
import os
import resource
import struct
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
from adversarial import NASTY_FRAGMENTS, json_like, nasty_text, numbers
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from components.data.conversation import ConversationError, Encoder
from components.data.dataset import load_tokenizer
from components.data.records import REASONS, BadRecord, RawSample, decode_image, parse_row, validate_row
from components.data.shards import RecordError, check_conversations, encode_record
from components.data.sources import llava_record, load_entries, safe_image_uri, unifood_family_records
from components.data.transform import ImageSpec, image_pixels, load_image_spec

FAST = settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
MAX_PIXELS = 1_000_000
pytestmark = pytest.mark.timeout(300)


def png(size: tuple[int, int] = (6, 4), mode: str = "RGB", fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def encoder(tiny_processor_dir: str) -> Encoder:
    """The text stage's encoder on the tiny model's tokenizer, with room for long conversations."""
    return Encoder(load_tokenizer(tiny_processor_dir), "vicuna_v1", num_visual_tokens=4, max_length=100_000)


def check_skip(exc: BaseException) -> None:
    """A skip must carry one of the counted reasons."""
    assert exc.reason in REASONS, exc  # type: ignore[attr-defined]


# ---------------------------------------------------------------- shard rows

turns = st.one_of(
    st.fixed_dictionaries({"from": st.sampled_from(["human", "gpt"]), "value": nasty_text}),
    st.fixed_dictionaries({"from": json_like(3), "value": json_like(3)}),
    json_like(3),
)
metas = st.one_of(
    json_like(),
    st.fixed_dictionaries(
        {"conversations": st.one_of(st.lists(turns, max_size=6), json_like(4))},
        optional={"images": st.one_of(st.lists(st.sampled_from(["png", "0.png", "1.jpg", "../x", "/etc", "json",
                                                                "__key__", "png\n", ""]), max_size=3), json_like(3)),
                  "task": st.one_of(st.just("caption"), nasty_text), "answer_fields": json_like(4)},
    ),
)


def json_bytes(draw_meta: Any, ascii_only: bool) -> bytes:
    return json.dumps(draw_meta, ensure_ascii=ascii_only).encode("utf-8", errors="surrogatepass")


rows = st.fixed_dictionaries(
    {
        "__key__": st.one_of(st.just("000000001"), nasty_text, json_like(2)),
        "json": st.one_of(
            st.builds(json_bytes, metas, st.booleans()),
            st.binary(max_size=200),
            st.builds(lambda m, cut: json_bytes(m, True)[:cut], metas, st.integers(0, 50)),
            st.none(),
            st.just(b'{"conversations": [{"from": "human", "value": "\\ud800<image>"}, {"from": "gpt", "value": "x"}]}'),
            st.just(b'{"n": ' + b"9" * 5000 + b"}"),
            st.just(b"[" * 50_000 + b"]" * 50_000),
        ),
    },
    optional={"png": st.one_of(st.just(png()), st.binary(max_size=64), st.just(b"")),
              "0.png": st.just(png()), "__url__": nasty_text},
)


@FAST
@given(row=rows)
def test_any_row_is_a_sample_or_a_counted_skip(row: dict[str, Any], encoder: Encoder) -> None:
    """What the text stage and the image stage do with a row, minus Ray."""
    try:
        sample = parse_row(row)
    except BadRecord as exc:
        check_skip(exc)
        return
    assert isinstance(sample, RawSample)
    (encoded,) = encoder.encode_many([sample.conversations])
    if isinstance(encoded, ConversationError):
        check_skip(encoded)
    else:
        assert encoded["input_ids"].shape == encoded["labels"].shape
    for data in sample.images:
        try:
            assert decode_image(data, MAX_PIXELS).mode == "RGB"
        except BadRecord as exc:
            assert exc.reason == "corrupt_image"


# ---------------------------------------------------------------- writer and reader agree


images_lists = st.lists(
    st.tuples(st.sampled_from(["png", "PNG", "jpeg", "tif", "exe", "", "../png"]),
              st.one_of(st.just(png()), st.just(b""), st.binary(max_size=8), json_like(1))),
    max_size=3,
)
conversations = st.one_of(
    st.lists(st.tuples(nasty_text, nasty_text), min_size=1, max_size=3).map(
        lambda pairs: [t for q, a in pairs for t in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]
    ),
    st.lists(turns, max_size=5),
    json_like(4),
)
records = st.fixed_dictionaries(
    {"conversations": conversations, "images": images_lists},
    optional={"id": st.one_of(nasty_text, numbers, json_like(2)), "task": nasty_text, "answer_fields": json_like(4),
              "extra": json_like(4)},
)


@FAST
@given(record=records, key=st.one_of(st.just("000000007"), nasty_text), turn=st.integers(0, 5))
@example(  # the placeholder in the answer: the reader refuses that (image_mismatch), so must the writer
    record={"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
            "images": [("png", png())]},
    key="000000007", turn=1,
)
def test_a_record_the_writer_accepts_is_never_skipped_by_the_reader(
    record: dict[str, Any], key: str, turn: int, encoder: Encoder
) -> None:
    """encode_record refuses with a RecordError, or writes members the training reader takes as they are."""
    # Give most records exactly the placeholders their images need (in some turn), so deeper checks run.
    turns_ = record["conversations"]
    if isinstance(turns_, list) and turns_ and record["images"]:
        for t in turns_:
            if isinstance(t, dict) and isinstance(t.get("value"), str):
                t["value"] = t["value"].replace("<image>", "")
        chosen = turns_[turn % len(turns_)]
        if isinstance(chosen, dict) and isinstance(chosen.get("value"), str):
            chosen["value"] = "<image>" * len(record["images"]) + chosen["value"]
    record.setdefault("id", "r1")
    try:
        members = encode_record(record, key)
    except RecordError as exc:
        assert "record" in str(exc)
        return
    row = {"__key__": key, "__url__": "shard-00000.tar", **members}
    sample = parse_row(row)  # no BadRecord: the writer already checked all of it
    assert len(sample.images) == len(record["images"])
    (encoded,) = encoder.encode_many([sample.conversations])
    assert not isinstance(encoded, ConversationError), f"written but always skipped: {encoded!r}"


@FAST
@given(conversations=conversations)
def test_check_conversations_returns_or_names_the_record(conversations: Any) -> None:
    try:
        assert check_conversations(conversations, "record 'x'") is conversations
    except RecordError as exc:
        assert str(exc).startswith("record 'x'")


# ---------------------------------------------------------------- images


def _encode(mode: str, fmt: str, size: tuple[int, int] = (7, 5)) -> bytes | None:
    """`mode` saved as `fmt`, or None when PIL cannot write that combination."""
    try:
        if mode in ("RGBA", "LA", "PA"):
            image = Image.new(mode, size)  # fully transparent
        elif mode == "P":
            image = Image.new("RGB", size, (200, 10, 10)).convert("P")
        else:
            image = Image.new(mode, size, 65535 if mode.startswith("I;16") else None)
        buffer = io.BytesIO()
        image.save(buffer, fmt)
        return buffer.getvalue()
    except (OSError, ValueError, KeyError, TypeError):
        return None


MODES = ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "I", "I;16", "I;16B", "F"]
FORMATS = ["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"]
SAMPLES = {(m, f): data for m in MODES for f in FORMATS if (data := _encode(m, f)) is not None}


@pytest.mark.parametrize(("mode", "fmt"), sorted(SAMPLES))
def test_every_mode_pil_can_write_decodes_to_rgb(mode: str, fmt: str) -> None:
    image = decode_image(SAMPLES[mode, fmt], MAX_PIXELS)
    assert (image.mode, image.size) == ("RGB", (7, 5))
    if mode in ("RGBA", "LA", "PA") and fmt in ("PNG", "TIFF", "WEBP"):
        assert image.getpixel((0, 0)) == (255, 255, 255), "transparency goes on white"
    if mode.startswith("I;16") and fmt in ("PNG", "TIFF"):
        assert image.getpixel((0, 0)) == (255, 255, 255), "16-bit white stays white"


def _mutate(data: bytes, how: str, where: float, value: int) -> bytes:
    at = int(where * len(data))
    if how == "truncate":
        return data[:at]
    if how == "flip":
        return data[:at] + bytes([data[at % len(data)] ^ (value or 1)]) + data[at + 1:]
    if how == "insert":
        return data[:at] + bytes([value]) * 16 + data[at:]
    return data[:at] + b"\x00" * (len(data) - at)  # zero the tail


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL's notes on damaged TIFF tags
@FAST
@given(
    sample=st.sampled_from(sorted(SAMPLES)),
    how=st.sampled_from(["truncate", "flip", "insert", "zero"]),
    where=st.floats(0, 1, exclude_max=True),
    value=st.integers(0, 255),
)
def test_damaged_images_are_rgb_or_corrupt(sample: tuple[str, str], how: str, where: float, value: int) -> None:
    data = _mutate(SAMPLES[sample], how, where, value)
    limit = Image.MAX_IMAGE_PIXELS
    try:
        assert decode_image(data, MAX_PIXELS).mode == "RGB"
    except BadRecord as exc:
        assert exc.reason == "corrupt_image"
    assert Image.MAX_IMAGE_PIXELS == limit, "PIL's process-wide limit is put back"


@FAST
@given(data=st.binary(max_size=512))
def test_random_bytes_are_corrupt_images(data: bytes) -> None:
    try:
        decode_image(data, MAX_PIXELS)
    except BadRecord as exc:
        assert exc.reason == "corrupt_image"


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_header(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR declaring `width` x `height`, then a tiny IDAT: a decompression bomb."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        _chunk(b"IEND", b"")


def gif_header(width: int, height: int) -> bytes:
    screen = struct.pack("<HHBBB", width, height, 0, 0, 0)
    frame = b"," + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x44\x01\x00;"
    return b"GIF89a" + screen + frame


def bmp_header(width: int, height: int) -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + 40 + 16, 0, 0, 54) + info + b"\0" * 16


def tiff_header(width: int, height: int) -> bytes:
    entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
               (273, 4, 1, 8), (277, 3, 1, 1), (278, 4, 1, height), (279, 4, 1, 16)]
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries) + b"\0\0\0\0"
    return b"II*\x00" + struct.pack("<I", 8 + 16) + b"\0" * 16 + ifd


def jpeg_header(width: int, height: int) -> bytes:
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 17, 8, height, width, 3) + b"\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    return b"\xff\xd8" + sof + b"\xff\xd9"


@pytest.fixture(scope="module")
def spec(tiny_processor_dir: str) -> ImageSpec:
    return load_image_spec(tiny_processor_dir)


@pytest.mark.parametrize("header", [png_header, gif_header, bmp_header, tiff_header, jpeg_header])
@pytest.mark.parametrize("size", [(100_000, 100_000), (65_535, 65_535), (1_500, 1_000), (100_000, 1)])
def test_decompression_bombs_are_refused_fast_without_allocating(
    header: Any, size: tuple[int, int], spec: ImageSpec
) -> None:
    """Small files declaring huge images: refused from the header, in well under a second."""
    width, height = size
    if header in (gif_header, jpeg_header):  # 16-bit sizes
        width, height = min(width, 65_535), min(height, 65_535)
    data = header(width, height)
    assert len(data) < 200
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    with pytest.raises(BadRecord) as err:
        image_pixels(data, spec, MAX_PIXELS)
    assert err.value.reason == "corrupt_image"
    assert time.monotonic() - started < 10  # decoding a 100000^2 bomb would take minutes (and 30 GB)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before
    assert grown_kib < 200 * 1024, f"peak memory grew by {grown_kib // 1024} MiB"


@pytest.mark.parametrize("size", [(1, 20_000), (20_000, 1), (1_200, 600)])
def test_strips_whose_square_padding_exceeds_the_limit_are_refused(spec: ImageSpec, size: tuple) -> None:
    """Inside the area limit, but padding to a square would allocate side^2 pixels (30 GB for 1 x 100000)."""
    data = png(size)
    assert decode_image(data, MAX_PIXELS).size == size  # the area alone is fine
    with pytest.raises(BadRecord, match="square padding exceeds"):
        image_pixels(data, spec, MAX_PIXELS)
    assert image_pixels(png((900, 700)), spec, MAX_PIXELS).shape == (*spec.output_hw, 3)


def test_validate_row_decodes_every_image_in_order() -> None:
    meta = {"conversations": [{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "x"}],
            "images": ["0.png", "1.png"]}
    row = {"__key__": "000000001", "json": json.dumps(meta).encode(), "0.png": png((3, 2)), "1.png": png((2, 3))}
    _, images = validate_row(row, MAX_PIXELS)
    assert [i.size for i in images] == [(3, 2), (2, 3)]
    with pytest.raises(BadRecord) as err:
        validate_row({**row, "1.png": png((3, 2))[:20]}, MAX_PIXELS)
    assert err.value.reason == "corrupt_image"


# ---------------------------------------------------------------- sources: paths and entries


@pytest.fixture(scope="module")
def image_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dataset root with one image, a symlink out of it, a symlinked folder out of it and one inside it."""
    base = tmp_path_factory.mktemp("sources")
    outside = base / "outside"
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(b"SECRET")
    root = base / "root"
    (root / "sub").mkdir(parents=True)
    (root / "a.png").write_bytes(png())
    (root / "link-out.png").symlink_to(outside / "secret.jpg")
    (root / "dir-out").symlink_to(outside)
    (root / "sub" / "link-in.png").symlink_to(root / "a.png")
    return root


@pytest.mark.parametrize(
    "rel",
    ["../outside/secret.jpg", "sub/../../outside/secret.jpg", "{outside}/secret.jpg", "link-out.png",
     "dir-out/secret.jpg", "sub/../dir-out/secret.jpg", "/etc/passwd", "..", ".", "", " ", "a.png\x00.jpg"],
)
def test_image_paths_cannot_leave_the_root(image_root: Path, rel: str) -> None:
    rel = rel.format(outside=image_root.parent / "outside")
    entry = {"id": "e1", "image": rel, "conversations": [{"from": "human", "value": "<image>"},
                                                         {"from": "gpt", "value": "a"}]}
    with pytest.raises(RecordError, match="record 'e1'") as err:
        llava_record((0, entry), "data.json", str(image_root))
    assert "SECRET" not in str(err.value)


@pytest.mark.parametrize("rel", ["sub", "a" * 300, "a.png/x", "missing.png"])
def test_unreadable_image_paths_fail_fast_naming_the_record(image_root: Path, rel: str) -> None:
    """A folder, a name too long for the filesystem, a file used as a folder: no retries, a RecordError."""
    entry = {"id": "e2", "image": rel, "conversations": [{"from": "human", "value": "<image>"},
                                                         {"from": "gpt", "value": "a"}]}
    started = time.monotonic()
    with pytest.raises(RecordError, match="record 'e2'"):
        llava_record((0, entry), "data.json", str(image_root))
    assert time.monotonic() - started < 1.2, "a path problem is not retried like an outage (>= 1.5 s of back-off)"


def test_paths_inside_the_root_resolve_through_symlinks(image_root: Path) -> None:
    for rel in ("a.png", "sub/link-in.png", "sub/../a.png", "./a.png"):
        assert Path(safe_image_uri(str(image_root), rel, "r")) == (image_root / "a.png").resolve()
    # The root itself behind a symlink is fine: both sides are resolved.
    alias = image_root.parent / "root-alias"
    if not alias.exists():
        alias.symlink_to(image_root)
    assert Path(safe_image_uri(str(alias), "a.png", "r")) == (image_root / "a.png").resolve()


path_parts = st.lists(st.sampled_from(["..", ".", "", "a.png", "sub", "link-out.png", "dir-out", "secret.jpg",
                                       "~", "%2e%2e", "\\", "é", "\x00"]), min_size=1, max_size=6)


@FAST
@given(parts=path_parts, absolute=st.booleans())
def test_any_local_path_stays_inside_or_is_refused(image_root: Path, parts: list[str], absolute: bool) -> None:
    rel = ("/" if absolute else "") + "/".join(parts)
    try:
        resolved = safe_image_uri(str(image_root), rel, "record 'x'")
    except RecordError as exc:
        assert "record 'x'" in str(exc)
        return
    real_root = os.path.realpath(image_root)
    assert os.path.realpath(resolved).startswith(real_root + os.sep)


@FAST
@given(parts=path_parts)
def test_any_s3_path_stays_under_the_prefix_or_is_refused(parts: list[str]) -> None:
    try:
        resolved = safe_image_uri("s3://bucket/data/set", "/".join(parts), "record 'x'")
    except RecordError:
        return
    assert resolved.startswith("s3://bucket/data/set/") and "/../" not in resolved + "/"


unifood_entries = st.fixed_dictionaries(
    {"id": st.one_of(st.just("dish-1"), nasty_text, numbers),
     "image": st.one_of(st.just("a.png"), st.just("a.png"), json_like(2))},
    optional={"ingredients": st.one_of(st.lists(nasty_text, max_size=3), json_like(4)),
              "recipe": st.one_of(nasty_text, st.lists(nasty_text, max_size=3), json_like(4)),
              "nutrition": st.one_of(json_like(4), st.fixed_dictionaries(
                  {k: numbers for k in ("mass", "cal", "fat", "protein", "carb")})),
              "mass": numbers},
)
llava_entries = st.fixed_dictionaries(
    {"conversations": st.one_of(conversations, st.just([{"from": "human", "value": "<image>"},
                                                        {"from": "gpt", "value": "ok"}]))},
    optional={"id": st.one_of(nasty_text, numbers, json_like(2)),
              "image": st.one_of(st.sampled_from(["a.png", "../x.png", "link-out.png"]), json_like(2),
                                 st.lists(st.sampled_from(["a.png", "sub/link-in.png"]), max_size=3))},
)


@FAST
@given(entry=unifood_entries)
def test_unifood_entries_become_records_or_named_errors(image_root: Path, entry: dict[str, Any]) -> None:
    try:
        records = unifood_family_records((0, entry), "food.json", str(image_root))
        for record in records:
            encode_record(record, "000000001")
    except RecordError as exc:
        assert "record" in str(exc)
        return
    for record in records:
        for value in record["answer_fields"].values():
            if isinstance(value, float):
                assert math.isfinite(value), f"non-finite ground truth written: {record['answer_fields']}"


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), -1, True, "12", None])
def test_nutrition_must_be_a_finite_number(image_root: Path, value: Any) -> None:
    nutrition = {"mass": 250, "cal": 380, "fat": 12, "protein": 20, "carb": value}
    with pytest.raises(RecordError, match="nutrition field 'carb'"):
        unifood_family_records((0, {"id": "d", "image": "a.png", "nutrition": nutrition}), "food.json",
                               str(image_root))


@FAST
@given(entry=llava_entries)
def test_llava_entries_become_records_or_named_errors(image_root: Path, entry: dict[str, Any]) -> None:
    try:
        record = llava_record((0, entry), "data.json", str(image_root))
        encode_record(record, "000000001")
    except RecordError as exc:
        assert "record" in str(exc)


@pytest.mark.parametrize(
    "content",
    [b"\xff\xfe[]", b"[" * 100_000, b"[{\"id\": " + b"9" * 5000 + b"}]", b"{\"a\": 1}", b"[1]", b"", b"[{\"id\": NaN"],
)
def test_unreadable_input_files_are_record_errors(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "data.json"
    path.write_bytes(content)
    with pytest.raises(RecordError, match="input file"):
        load_entries(str(path))


@pytest.mark.parametrize("fragment", NASTY_FRAGMENTS[:12])
def test_jsonl_with_nasty_lines(tmp_path: Path, fragment: str) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"id": 1}\n' + fragment.encode("utf-8", errors="surrogatepass") + b"\n")
    try:
        assert load_entries(str(path))[0] == {"id": 1}
    except RecordError as exc:
        assert "input file" in str(exc)
