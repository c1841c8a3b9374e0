"""The LLaVA and UniFood converters fuzzed with whole input files, through the entry point a user's run uses.

Each generated file (JSON or JSON Lines, LLaVA or UniFood) is written next to a few real images and
converted by `components.data.prepare.prepare` (what ``data.source: llava | unifood`` and
pipelines/prepare_data.py run) into shards in a fresh folder. The files hold good records and,
in most examples, damage: wrong nesting, missing and extra keys, non-string values, huge strings,
``<image>`` tokens that do not match the images, duplicate ids, bad UTF-8, lone surrogate
escapes, truncated or wrapped JSON, numbers past any limit.

What is guaranteed, for every file:

- the conversion succeeds, and then every record of the file is in the written shards (LLaVA: one
  per entry, conversations unchanged; UniFood: one per family an entry fills), or
- it ends in a `RecordError` (a `DuetError`, so the CLI prints one line) whose message names the
  input file; for a damaged entry it also names the entry (``entry #N``, with its id when it has
  one) and the field, and is short enough to read. No other exception type, never a traceback.
- Files whose damage is known to the generator must fail with the matching error; undamaged
  files must convert.
- Images that are present but hold broken bytes are not the converter's business: such a file
  converts completely, and when the shards are read, exactly the records with a broken image are
  counted skips (``corrupt_image``, through the reader's own row validation and the split's
  quality monitor) while every other record decodes.

About 1,000 files are generated in all (see `test_enough_files_were_converted`); the examples are
derandomized, so CI runs the same files every time.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import random
import re
import shutil
import tarfile
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from adversarial import NASTY_FRAGMENTS, any_char, json_like, nasty_text, numbers
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from components.config import DataSection
from components.data.prepare import prepare
from components.data.preprocessors import shard_name
from components.data.quality import _Monitor
from components.data.records import BadRecord, parse_row
from components.data.shards import RecordError, shard_uris
from components.data.sources import NUTRITION_FIELDS
from components.data.transform import ImageSpec, image_pixels
from components.errors import DuetError

pytestmark = pytest.mark.timeout(300)

EXAMPLES = {"llava": 330, "unifood": 330, "chaos": 260, "broken_images": 80}
FILES: Counter[str] = Counter()  # files converted, per test
MAX_PIXELS = 1_000_000
MAX_MESSAGE = 2_000  # characters: an error is one readable line, not a dump of the input


def fuzz(name: str) -> settings:
    return settings(
        max_examples=EXAMPLES[name], deadline=None, derandomize=True, database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                               HealthCheck.large_base_example],
    )


# ---------------------------------------------------------------- the images next to the input files


def _image(fmt: str, size: tuple[int, int] = (6, 4)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 90)).save(buffer, fmt)
    return buffer.getvalue()


GOOD_IMAGES = [
    "img/a.png", "./img/b.jpg", "img/sub/../a.png", "img/sub/d.PNG", "img/c.gif", "img/no-extension",
]
BROKEN_IMAGES = ["broken/truncated.png", "broken/noise.jpg", "broken/html.png", "broken/zeros.webp"]
BAD_IMAGES = [  # each one fails the file, naming the record and the image
    "bad/empty.png", "bad/note.txt", "bad/folder.png", "missing.png", "../outside.png", "/etc/hostname",
    "", " ", "img/a.png\x00", "img/a.png/x", "a" * 300 + ".png", "img/" + "x/" * 3000 + "a.png",
    "s3://bucket/a.png",
]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Where the files and shards go: memory (/dev/shm) where there is one, since writing a split fsyncs its
    files and a thousand conversions on a slow disk take minutes; the shard writer's own temporary folders
    go there too. Real files either way, only faster ones."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 512 * 2**20):
        yield tmp_path_factory.mktemp("fuzz-converters")
        return
    base = Path(tempfile.mkdtemp(prefix="duet-fuzz-converters-", dir=shm))
    previous, tempfile.tempdir = tempfile.tempdir, str(base / "tmp")
    (base / "tmp").mkdir()
    try:
        yield base
    finally:
        tempfile.tempdir = previous
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def root(scratch: Path) -> Path:
    """The folder of the input files (so the default image root): good, broken and unusable images."""
    (scratch / "outside.png").write_bytes(_image("PNG"))
    root = scratch / "data"
    for folder in ("img/sub", "broken", "bad/folder.png"):
        (root / folder).mkdir(parents=True)
    (root / "img" / "a.png").write_bytes(_image("PNG"))
    (root / "img" / "b.jpg").write_bytes(_image("JPEG", (9, 7)))
    (root / "img" / "sub" / "d.PNG").write_bytes(_image("PNG", (3, 5)))
    (root / "img" / "c.gif").write_bytes(_image("GIF"))
    (root / "img" / "no-extension").write_bytes(_image("PNG", (4, 4)))  # stored as .jpg; decoded by content
    (root / "broken" / "truncated.png").write_bytes(_image("PNG", (40, 40))[:40])
    (root / "broken" / "noise.jpg").write_bytes(random.Random(7).randbytes(300))
    (root / "broken" / "html.png").write_bytes(b"<html><body>404 Not Found</body></html>")
    (root / "broken" / "zeros.webp").write_bytes(b"\0" * 100)
    (root / "bad" / "empty.png").write_bytes(b"")
    (root / "bad" / "note.txt").write_bytes(_image("PNG"))
    return root


# ---------------------------------------------------------------- converting one file


@dataclass
class Output:
    records: dict[str, dict] = field(default_factory=dict)  # id -> the record's JSON
    images: dict[str, list[bytes]] = field(default_factory=dict)  # id -> its image members, in order
    rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # split -> its WebDataset rows
    captions: dict[str, dict] = field(default_factory=dict)  # the caption split (data.caption_input), by id


def _read_back(results: list) -> Output:
    out = Output()
    for result in results:
        rows = out.rows.setdefault(result.split, [])
        for uri in shard_uris(result.uri, result.manifest):
            grouped: dict[str, dict[str, Any]] = {}
            with tarfile.open(uri) as tar:
                for member in tar.getmembers():
                    key, _, suffix = member.name.partition(".")  # WebDataset: key up to the first dot
                    row = grouped.setdefault(key, {"__key__": key, "__url__": uri})
                    row[suffix] = tar.extractfile(member).read()
            for row in grouped.values():
                meta = json.loads(row["json"])
                rows.append(row)
                if result.split == "caption":
                    out.captions[meta["id"]] = meta
                    continue
                assert meta["id"] not in out.records, f"record {meta['id']!r} written twice"
                out.records[meta["id"]] = meta
                out.images[meta["id"]] = [row[suffix] for suffix in meta["images"]]
        assert result.manifest.count == len(rows)
    return out


_sequence = itertools.count()


def convert(
    root: Path, test: str, source: str, suffix: str, content: bytes, threads: int = 1, caption: bool = False
) -> tuple[str, Output | None, DuetError | None]:
    """Write `content` as an input file and run prepare on it; (input path, shards read back, error).

    With `caption`, the same file is also the LLaVA stage-1 caption input (data.caption_input)."""
    FILES[test] += 1
    n = next(_sequence)
    path = root / f"{test}-{n}{suffix}"
    path.write_bytes(content)
    out = root.parent / f"out-{n}"
    data = DataSection(source=source, input=str(path), root=str(out), name="fuzz", val_fraction=0.25,
                       test_fraction=0.25, records_per_shard=3, io_threads=threads,
                       caption_input=str(path) if caption else None)
    try:
        return str(path), _read_back(prepare(data)), None
    except DuetError as exc:  # anything else is a bug: it propagates and fails the test with its traceback
        return str(path), None, exc
    finally:
        path.unlink()
        shutil.rmtree(out, ignore_errors=True)


def outcome(error: DuetError | None) -> str:
    """For --hypothesis-show-statistics: how often files convert, and which errors they end in."""
    if error is None:
        return "converted"
    return "error: " + re.sub(r"[0-9]+", "N", str(error).split(": ")[-1])[:60]


def check_named(exc: DuetError, path: str) -> str:
    message = str(exc)
    assert isinstance(exc, RecordError), f"{type(exc).__name__}: {message[:500]}"
    assert path in message, f"the error does not name the input file: {message[:500]}"
    if "duplicate ids" not in message:  # prepare.py lists up to five duplicate ids in full
        assert len(message) < MAX_MESSAGE, f"a {len(message)}-character error: {message[:500]}..."
    return message


# ---------------------------------------------------------------- text


def _no_placeholder(text: str) -> str:
    while "<image>" in text:
        text = text.replace("<image>", "")
    return text


def _clean(fragment: str) -> bool:
    return "<image>" not in fragment and not any(0xD800 <= ord(c) <= 0xDFFF for c in fragment)


clean_chars = st.characters(exclude_categories=["Cs"])  # anything but surrogates
short_text = st.one_of(
    st.text(clean_chars, max_size=30),
    st.lists(st.sampled_from([f for f in NASTY_FRAGMENTS if _clean(f)]), max_size=6).map("".join),
).map(_no_placeholder)
huge_text = st.builds(  # with what str.splitlines would cut a JSON Lines file at
    lambda c, n: c * n, st.sampled_from(["a", "é", "模", "🙂", "\u2028", "\x85", "\x00", " \n", "\\"]),
    st.integers(5_000, 200_000),
)
text = st.one_of(short_text, short_text, short_text, short_text, huge_text)
answer = st.builds(lambda t, w: t + w, text, st.text("abcxyz", min_size=1, max_size=4))  # never blank
clean_scalars = st.one_of(st.none(), st.booleans(), numbers, text)
clean_json = st.recursive(
    clean_scalars, lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(short_text, c, max_size=3)),
    max_leaves=8,
)
LLAVA_KEYS = {"id", "image", "conversations", "task", "answer_fields"}
UNIFOOD_KEYS = {"id", "image", "ingredients", "recipe", "nutrition", *NUTRITION_FIELDS}
extra_keys = st.dictionaries(short_text.filter(lambda k: k not in LLAVA_KEYS | UNIFOOD_KEYS), clean_json,
                             max_size=3)


@st.composite
def record_id(draw: st.DrawFn, i: int) -> str | int:
    """A valid id, unique in its file: an integer, or any text ending in '#i' (never a number's digits)."""
    if draw(st.booleans()):
        return draw(st.sampled_from([i, 10**18 + i, -i - 1]))
    return f"{draw(text)}#{i}"


def _image_field(draw: st.DrawFn, paths: list[str]) -> Any:
    if not paths:
        return draw(st.sampled_from(["absent", None]))
    if len(paths) == 1 and draw(st.booleans()):
        return paths[0]
    return paths


# ---------------------------------------------------------------- good entries


@st.composite
def llava_entry(draw: st.DrawFn, i: int, images: list[str]) -> dict:
    paths = draw(st.lists(st.sampled_from(images), max_size=3))
    turns = []
    for _ in range(draw(st.integers(1, 3))):
        turns += [{"from": "human", "value": draw(text)}, {"from": "gpt", "value": draw(answer)}]
    for _ in paths:  # one placeholder per image, in any human turn, before or after its text
        turn = turns[2 * draw(st.integers(0, len(turns) // 2 - 1))]
        where = draw(st.sampled_from(["<image>\n{}", "{}<image>", "{} <image> "]))
        turn["value"] = where.format(turn["value"])
    entry = {**draw(extra_keys), "id": draw(record_id(i)), "conversations": turns}
    image = _image_field(draw, paths)
    if image != "absent":
        entry["image"] = image
    optional = draw(st.fixed_dictionaries({}, optional={
        "task": st.one_of(st.sampled_from(["chat", "vqa", "caption", None]), answer),
        "answer_fields": st.one_of(st.none(), st.just({}),
                                   st.dictionaries(text, clean_json, min_size=1, max_size=3)),
    }))
    return {**entry, **optional}


amounts = st.one_of(st.integers(0, 2**70), st.floats(0, 1e300),
                    st.sampled_from([0, 0.0, -0.0, 1e-320, 250, 12.25]))


@st.composite
def unifood_entry(draw: st.DrawFn, i: int, images: list[str]) -> dict:
    families = draw(st.sets(st.sampled_from(["items", "description", "numeric"]), min_size=1))
    entry = {**draw(extra_keys), "id": draw(record_id(i))}
    path = draw(st.sampled_from(images))
    entry["image"] = draw(st.sampled_from([path, [path]]))
    if "items" in families:
        entry["ingredients"] = draw(st.lists(answer, min_size=1, max_size=4))
    elif draw(st.booleans()):
        entry["ingredients"] = draw(st.sampled_from([[], None]))
    if "description" in families:
        steps = st.lists(st.one_of(answer, st.just("  ")), max_size=4).map(lambda steps: [*steps, "Serve."])
        entry["recipe"] = draw(st.one_of(answer, steps))
    elif draw(st.booleans()):
        entry["recipe"] = draw(st.sampled_from([None, "", "  \n", [], ["", " "]]))
    if "numeric" in families:
        values = {name: draw(amounts) for name in NUTRITION_FIELDS}
        if draw(st.booleans()):
            keys = short_text.filter(lambda k: k not in NUTRITION_FIELDS)
            entry["nutrition"] = {**values, **draw(st.dictionaries(keys, clean_json, max_size=2))}
        else:
            entry.update(values)  # the flat form
    return entry


def expected_ids(source: str, entries: list[dict]) -> set[str]:
    if source == "llava":
        return {str(e["id"]) for e in entries}
    out = set()
    for e in entries:
        recipe = e.get("recipe")
        steps = recipe if isinstance(recipe, list) else [recipe or ""]
        filled = {"items": bool(e.get("ingredients")), "description": any(s.strip() for s in steps),
                  "numeric": e.get("nutrition") is not None or any(k in e for k in NUTRITION_FIELDS)}
        out |= {f"{e['id']}-{family}" for family, present in filled.items() if present}
    return out


# ---------------------------------------------------------------- damage the generator knows about

# JSON that json.dumps cannot write (or that is slow to build as objects): an entry holds "@@rawN@@",
# which `serialize` replaces with RAW_TEXTS[N].
RAW_TEXTS = [
    "1" + "0" * 5000, "-" + "9" * 4301, "[" * 100_000 + "]" * 100_000, '{"a":' * 50_000 + "1" + "}" * 50_000,
]


@dataclass(frozen=True)
class Damage:
    """A change to one entry; `pattern` is what the error must say; the entry is named unless not `named`."""

    name: str
    apply: Callable[[st.DrawFn, dict, list[dict]], Any]
    pattern: str
    named: bool = True


def _set(key: str, values: st.SearchStrategy) -> Callable[[st.DrawFn, dict, list[dict]], dict]:
    def apply(draw: st.DrawFn, entry: dict, _: list[dict]) -> dict:
        return {**entry, key: draw(values)}
    return apply


def _drop(*keys: str) -> Callable[[st.DrawFn, dict, list[dict]], dict]:
    return lambda draw, entry, _: {k: v for k, v in entry.items() if k not in keys}


def _turns(edit: Callable[[st.DrawFn, list[dict]], Any]) -> Callable[[st.DrawFn, dict, list[dict]], dict]:
    def apply(draw: st.DrawFn, entry: dict, _: list[dict]) -> dict:
        return {**entry, "conversations": edit(draw, [dict(t) for t in entry["conversations"]])}
    return apply


def _bad_turn(draw: st.DrawFn, turns: list[dict]) -> list:
    i = draw(st.integers(0, len(turns) - 1))
    turns[i] = draw(st.one_of(
        st.sampled_from(["hello", 3, None, [], ["human", "hi"]]),
        st.builds(lambda t: {k: v for k, v in t.items() if k != "value"}, st.just(turns[i])),
        st.builds(lambda t: {k: v for k, v in t.items() if k != "from"}, st.just(turns[i])),
        st.builds(lambda t, v: {**t, "value": v}, st.just(turns[i]),
                  st.sampled_from([7, None, ["a"], {"t": "a"}])),
        st.builds(lambda t, r: {**t, "from": r}, st.just(turns[i]),
                  st.sampled_from(["user", "assistant", "system", "GPT", "", None, 1])),
    ))
    return turns


def _placeholder_in_answer(draw: st.DrawFn, turns: list[dict]) -> list:
    turn = turns[2 * draw(st.integers(0, len(turns) // 2 - 1)) + 1]
    turn["value"] += "<image>"
    return turns


def _order(draw: st.DrawFn, turns: list[dict]) -> list:
    how = draw(st.sampled_from(["swap", "extra human", "gpt first", "two humans"]))
    if how == "swap":
        return [{**t, "from": "gpt" if t["from"] == "human" else "human"} for t in turns]
    if how == "extra human":
        return [*turns, {"from": "human", "value": "and then?"}]
    if how == "gpt first":
        return [{"from": "gpt", "value": "hi"}, *turns]
    return [turns[0], {"from": "human", "value": "more"}, *turns[1:]]


def _empty_answer(draw: st.DrawFn, turns: list[dict]) -> list:
    answer_turn = turns[2 * draw(st.integers(0, len(turns) // 2 - 1)) + 1]
    answer_turn["value"] = draw(st.sampled_from(["", " ", "\n\t"]))
    return turns


def _placeholders(draw: st.DrawFn, entry: dict, _: list[dict]) -> dict:
    """One `<image>` too many or too few for the images."""
    turns = [dict(t) for t in entry["conversations"]]
    with_token = [t for t in turns if "<image>" in t["value"]]
    if with_token and draw(st.booleans()):
        turn = draw(st.sampled_from(with_token))
        turn["value"] = turn["value"].replace("<image>", "", 1)
    else:
        turns[0]["value"] += draw(st.sampled_from(["<image>", " <image>\n"]))
    return {**entry, "conversations": turns}


def _image_without_token(draw: st.DrawFn, entry: dict, _: list[dict]) -> dict:
    paths = entry.get("image")
    paths = [] if paths is None else [paths] if isinstance(paths, str) else list(paths)
    return {**entry, "image": [*paths, draw(st.sampled_from(GOOD_IMAGES))]}


def _bad_image(draw: st.DrawFn, entry: dict, _: list[dict]) -> dict:
    """An unusable path (or a non-path) in place of one image, placeholders unchanged."""
    bad = draw(st.sampled_from([*BAD_IMAGES, 3, True, {"path": "img/a.png"}, ["img/a.png"]]))
    image = entry.get("image")
    if isinstance(image, list) and image:
        image = list(image)
        image[draw(st.integers(0, len(image) - 1))] = bad
        return {**entry, "image": image}
    if image is None:  # a text-only LLaVA record: give it the placeholder too
        turns = [dict(t) for t in entry["conversations"]]
        turns[0]["value"] = "<image>" + turns[0]["value"]
        return {**entry, "image": bad, "conversations": turns}
    return {**entry, "image": bad}


def _duplicate(draw: st.DrawFn, entry: dict, entries: list[dict]) -> dict:
    other = draw(st.sampled_from(entries))["id"]
    if isinstance(other, dict | list) or other is None:
        return {**entry, "id": "dup"}
    return {**entry, "id": draw(st.sampled_from([other, str(other)]))}  # 7 and "7" are the same id


def _surrogate(draw: st.DrawFn, entry: dict, _: list[dict]) -> dict:
    """A lone UTF-16 surrogate in some string of the entry, or in a new key."""
    lone = draw(st.sampled_from(["\ud800", "\udfff", "\udcff", "x\ud83d"]))
    keys = [k for k, v in entry.items() if isinstance(v, str)]
    if keys and draw(st.booleans()):
        key = draw(st.sampled_from(keys))
        return {**entry, key: entry[key] + lone}
    return {**entry, draw(st.sampled_from(["note", "t" + lone])): lone}


def _raw(indices: list[int]) -> Callable[[st.DrawFn, dict, list[dict]], dict]:
    return lambda draw, entry, _: {**entry, "extra": f"@@raw{draw(st.sampled_from(indices))}@@"}


def _replace(key: str, value: Any) -> Callable[[st.DrawFn, dict, list[dict]], dict]:
    return lambda draw, entry, _: {**entry, key: value}


def _not_an_object(draw: st.DrawFn, entry: dict, _: list[dict]) -> Any:
    return draw(st.sampled_from([[entry], "record", 7, None, True, []]))


def _no_image(draw: st.DrawFn, entry: dict, _: list[dict]) -> dict:
    rest = {k: v for k, v in entry.items() if k != "image"}
    return {**rest, **draw(st.sampled_from([{}, {"image": None}]))}


_drop_families = _drop("ingredients", "recipe", "nutrition", *NUTRITION_FIELDS)


def _families(make: Callable[[st.DrawFn], dict]) -> Callable[[st.DrawFn, dict, list[dict]], dict]:
    """The entry with its ingredients, recipe and nutrition replaced by `make`'s."""
    return lambda draw, entry, others: {**_drop_families(draw, entry, others), **make(draw)}


def _bad_amount(draw: st.DrawFn) -> dict:
    bad = [float("nan"), float("inf"), -float("inf"), -1, -0.5, True, "12", None, [1], {"g": 1}, 10**400]
    field = draw(st.sampled_from(NUTRITION_FIELDS))
    nutrition = {**dict.fromkeys(NUTRITION_FIELDS, 1), field: draw(st.sampled_from(bad))}
    return {"ingredients": ["salt"], "nutrition": nutrition}


def _missing_amount(draw: st.DrawFn) -> dict:
    present = draw(st.lists(st.sampled_from(NUTRITION_FIELDS), max_size=4, unique=True))
    return {"recipe": "boil", "nutrition": dict.fromkeys(present, 1)}


def _partial_flat_nutrition(draw: st.DrawFn) -> dict:
    return {"ingredients": ["salt"], draw(st.sampled_from(NUTRITION_FIELDS)): 100}


NO_FAMILY = [{}, {"ingredients": [], "recipe": "  "}, {"recipe": ["", " "]}, {"nutrition": None}]
BAD_CONVERSATIONS = [
    {}, "hi", 3, None, [], {"from": "human", "value": "hi"}, [[{"from": "human", "value": "q"}]],
    {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
]
BAD_INGREDIENTS = [
    "rice", 3, {"rice": 1}, [1, 2], ["rice", ""], ["  "], [None], [["rice"]], ["rice", "<image>"],
]
BAD_RECIPES = [3, True, {"step": "boil"}, ["boil", 2], [["boil"]], "<image> boil", ["boil", "then <image>"]]

ids = [
    Damage("no id", _drop("id"), "'id'"),
    Damage("blank id", _set("id", st.sampled_from(["", "   ", "\n", None])), "'id'"),
    Damage("id type", _set("id", st.sampled_from([1.5, 0.0, True, False, [1], {"id": 1}, ["a"]])), "'id'"),
    Damage("duplicate id", _duplicate, "duplicate ids", named=False),
]
anywhere = [
    Damage("not an object", _not_an_object, "must be a JSON object"),
    Damage("lone surrogate", _surrogate, "surrogate"),  # or, written unescaped, not UTF-8: see `expectations`
    Damage("huge integer", _raw([0, 1]), "a number of more than 4300 digits", named=False),
    Damage("deep nesting", _raw([2, 3]), "nest too deep", named=False),
]
LLAVA_DAMAGE = ids + anywhere + [
    Damage("no conversations", _drop("conversations"), "'conversations'"),
    Damage("conversations shape", _set("conversations", st.sampled_from(BAD_CONVERSATIONS)), "conversations"),
    Damage("bad turn", _turns(_bad_turn), r"conversations\[\d+\]"),
    Damage("turn order", _turns(_order), r"turn"),
    Damage("empty answer", _turns(_empty_answer), "empty answer"),
    Damage("placeholder in answer", _turns(_placeholder_in_answer), r"conversations\[\d+\] \(gpt\) contains"),
    Damage("placeholder count", _placeholders, r"image\(s\) in 'image' but \d+ '<image>' placeholder"),
    Damage("image without placeholder", _image_without_token, r"image\(s\) in 'image' but"),
    Damage("empty image list", _replace("image", []), "'image' is an empty list"),
    Damage("bad image", _bad_image, "image"),
    Damage("task type", _set("task", st.sampled_from(["", "  ", 3, 0, False, ["chat"], {"t": 1}])), "'task'"),
    Damage("answer_fields type", _set("answer_fields", st.sampled_from([[1], "ref", 3, True, [{"a": 1}]])),
           "'answer_fields'"),
]
UNIFOOD_DAMAGE = ids + anywhere + [
    Damage("no image", _no_image, "exactly one 'image'"),
    Damage("two images", _replace("image", ["img/a.png", "img/b.jpg"]), "exactly one 'image'"),
    Damage("empty image list", _replace("image", []), "'image' is an empty list"),
    Damage("bad image", _bad_image, "image"),
    Damage("nothing to learn", _families(lambda draw: draw(st.sampled_from(NO_FAMILY))), "nothing to learn"),
    Damage("ingredients", _set("ingredients", st.sampled_from(BAD_INGREDIENTS)), "'ingredients'"),
    Damage("recipe", _set("recipe", st.sampled_from(BAD_RECIPES)), "'recipe'"),
    Damage("nutrition shape", _set("nutrition", st.sampled_from([[250, 380], "250", 3, True])),
           "'nutrition'"),
    Damage("nutrition value", _families(_bad_amount), "nutrition field"),
    Damage("nutrition field missing", _families(_missing_amount), "nutrition field"),
    Damage("flat nutrition partial", _families(_partial_flat_nutrition), "nutrition field"),
]


# ---------------------------------------------------------------- whole files


@dataclass(frozen=True)
class FileDamage:
    name: str
    apply: Callable[[st.DrawFn, bytes, str], bytes]
    pattern: str


BOM = "\ufeff".encode()


def _wrapped(draw: st.DrawFn, data: bytes, suffix: str) -> bytes:
    """The list inside an object ({"data": [...]}); JSON Lines: all records in one list on one line."""
    data = data.removeprefix(BOM)
    if suffix == ".json":
        return b'{"data": ' + data + b"}"
    return b"[" + b",".join(line for line in data.split(b"\n") if line.strip()) + b"]"


def _truncated(draw: st.DrawFn, data: bytes, suffix: str) -> bytes:
    return data.rstrip()[:-1] if suffix == ".json" else data + b'\n{"id": 1,'


def _utf16(draw: st.DrawFn, data: bytes, suffix: str) -> bytes:
    return data.decode("utf-8", "surrogatepass").encode("utf-16", "surrogatepass")


def _bytes(pieces: list[bytes], where: str) -> Callable[[st.DrawFn, bytes, str], bytes]:
    def apply(draw: st.DrawFn, data: bytes, suffix: str) -> bytes:
        piece = draw(st.sampled_from(pieces))
        at = draw(st.integers(0, len(data))) if where == "anywhere" else len(data)
        return data[:at] + piece + data[at:]
    return apply


FILE_DAMAGE = [
    # A byte no UTF-8 text holds (\xff), or a lead byte followed by no continuation byte (\xe9, \xc3).
    FileDamage("latin-1 byte", _bytes([b"\xff", b"\xe9"], "anywhere"), "not UTF-8"),
    FileDamage("cut character", _bytes([b"\xc3", b"\xe6\xa8"], "end"), "not UTF-8"),
    FileDamage("utf-16", _utf16, "not UTF-8"),
    FileDamage("truncated", _truncated, "not valid JSON"),
    FileDamage("trailing garbage", _bytes([b"}{", b" x", b"\n]"], "end"), "not valid JSON"),
    FileDamage("wrapped", _wrapped, r"JSON list|must be a JSON object"),
    FileDamage("empty", lambda draw, data, suffix: draw(st.sampled_from([b"", b" \n", b"\n\n", b"[]", BOM])),
               r"holds no records|not valid JSON|must be a JSON object"),
]


@st.composite
def layout(draw: st.DrawFn) -> dict:
    """How a file is written: JSON or JSON Lines, escaping, indentation, byte-order mark, line endings."""
    return draw(st.fixed_dictionaries({
        "suffix": st.sampled_from([".json", ".jsonl"]), "ascii": st.booleans(),
        "indent": st.sampled_from([None, None, 1, "\t"]), "bom": st.sampled_from([False, False, False, True]),
        "crlf": st.booleans(), "blank_lines": st.booleans(), "threads": st.sampled_from([1, 1, 4]),
        "caption": st.sampled_from([False, False, False, True]),
    }))


def serialize(entries: list[Any], how: dict) -> bytes:
    if how["suffix"] == ".json":
        text = json.dumps(entries, ensure_ascii=how["ascii"], indent=how["indent"])
    else:
        lines = [json.dumps(e, ensure_ascii=how["ascii"]) for e in entries]
        text = ("\n\n" if how["blank_lines"] else "\n").join(lines) + "\n"
    if how["crlf"]:
        text = text.replace("\n", "\r\n")
    text = re.sub(r'"@@raw(\d+)@@"', lambda m: RAW_TEXTS[int(m.group(1))], text)
    return ("\ufeff" if how["bom"] else "").encode() + text.encode("utf-8", "surrogatepass")


def expectations(
    damage: list[tuple[int, Damage]], file_damage: FileDamage | None, how: dict
) -> list[tuple[str, int | None]]:
    """The errors a damaged file may end in, any one of them: (pattern, the entry it must name or None)."""
    out: list[tuple[str, int | None]] = []
    for n, d in damage:
        if d.name == "lone surrogate" and not how["ascii"]:
            out.append(("not UTF-8", None))  # written unescaped, a surrogate is bytes no UTF-8 decoder takes
        else:
            out.append((d.pattern, n if d.named else None))
    if file_damage is not None:
        out.append((file_damage.pattern, None))
    return out


@st.composite
def damaged_file(draw: st.DrawFn, source: str) -> tuple[list[Any], dict, bytes, list[tuple[str, int | None]]]:
    """Good entries, maybe damaged, or the whole file damaged: (entries, layout, bytes, expected errors)."""
    make = llava_entry if source == "llava" else unifood_entry
    entries: list[Any] = [draw(make(i, GOOD_IMAGES + BROKEN_IMAGES)) for i in range(draw(st.integers(1, 6)))]
    mode = draw(st.sampled_from(["clean", "clean", "entry", "entry", "entry", "file"]))
    damage: list[tuple[int, Damage]] = []
    if mode == "entry":
        for n in sorted(draw(st.sets(st.integers(0, len(entries) - 1), min_size=1, max_size=2))):
            d = draw(st.sampled_from(LLAVA_DAMAGE if source == "llava" else UNIFOOD_DAMAGE))
            others = [e for i, e in enumerate(entries) if i != n and isinstance(e, dict) and "id" in e]
            if d.name == "duplicate id" and not others:
                entries.append(dict(entries[n]))  # the same record twice
            else:
                entries[n] = d.apply(draw, entries[n], others)
            damage.append((n, d))
    how = draw(layout())
    content = serialize(entries, how)
    file_damage = draw(st.sampled_from(FILE_DAMAGE)) if mode == "file" else None
    if file_damage is not None:
        content = file_damage.apply(draw, content, how["suffix"])
    return entries, how, content, expectations(damage, file_damage, how) if mode != "clean" else []


def check_converted(source: str, entries: list[dict], out: Output, root: Path, caption: bool = False) -> None:
    """Every record of the file is in the shards, as it was written (LLaVA: conversations and image bytes)."""
    assert set(out.records) == expected_ids(source, entries)
    if source != "llava":
        return
    if caption:
        assert set(out.captions) == set(out.records)
        assert all(meta["task"] == "caption" for meta in out.captions.values())
    for entry in entries:
        meta = out.records[str(entry["id"])]
        assert meta["conversations"] == entry["conversations"]
        image = entry.get("image")
        paths = [] if image is None else [image] if isinstance(image, str) else image
        assert meta["source_images"] == paths
        assert out.images[str(entry["id"])] == [(root / p).read_bytes() for p in paths]


def run_file(root: Path, test: str, source: str, drawn: tuple[list[Any], dict, bytes, list]) -> None:
    entries, how, content, expected = drawn
    caption = how["caption"] and source == "llava"
    path, out, error = convert(root, test, source, how["suffix"], content, how["threads"], caption)
    event(outcome(error))
    if not expected:
        assert error is None, f"an undamaged file failed: {str(error)[:1000]}"
        assert out is not None
        check_converted(source, entries, out, root, caption)
        return
    assert error is not None, f"damaged file converted: {expected}"
    message = check_named(error, path)
    assert any(re.search(pattern, message) and (n is None or re.search(rf"entry #{n}\b", message))
               for pattern, n in expected), f"expected one of {expected}, got: {message[:1000]}"


@fuzz("llava")
@given(drawn=damaged_file("llava"))
def test_llava_files_convert_whole_or_fail_naming_file_entry_and_field(root: Path, drawn: Any) -> None:
    run_file(root, "llava", "llava", drawn)


@fuzz("unifood")
@given(drawn=damaged_file("unifood"))
def test_unifood_files_convert_whole_or_fail_naming_file_entry_and_field(root: Path, drawn: Any) -> None:
    run_file(root, "unifood", "unifood", drawn)


# ---------------------------------------------------------------- anything at all

ALL_IMAGES = GOOD_IMAGES + BROKEN_IMAGES + BAD_IMAGES
loose_turn = st.one_of(
    st.fixed_dictionaries({
        "from": st.sampled_from(["human", "gpt"]),
        "value": st.one_of(nasty_text, answer, st.sampled_from(["<image>", "<image>\nq"])),
    }),
    json_like(3),
)
loose_entry = st.fixed_dictionaries({}, optional={
    "id": st.one_of(st.integers(-3, 3), nasty_text, json_like(2)),
    "image": st.one_of(st.sampled_from(ALL_IMAGES), st.lists(st.sampled_from(ALL_IMAGES), max_size=3),
                       json_like(2)),
    "conversations": st.one_of(st.lists(loose_turn, max_size=5), json_like(4)),
    "task": json_like(2), "answer_fields": json_like(3),
    "ingredients": st.one_of(st.lists(nasty_text, max_size=3), json_like(3)),
    "recipe": st.one_of(nasty_text, st.lists(nasty_text, max_size=3), json_like(3)),
    "nutrition": st.one_of(json_like(3), st.fixed_dictionaries({k: numbers for k in NUTRITION_FIELDS})),
    "mass": numbers, "extra": json_like(4),
})


@st.composite
def chaos_file(draw: st.DrawFn) -> tuple[str, str, bytes]:
    source = draw(st.sampled_from(["llava", "unifood"]))
    how = draw(layout())
    good = llava_entry if source == "llava" else unifood_entry
    entries = draw(st.lists(st.one_of(loose_entry, json_like(2), good(0, ALL_IMAGES), good(1, GOOD_IMAGES)),
                            max_size=6))
    content = draw(st.one_of(
        st.just(None), st.just(None), st.just(None),
        st.binary(max_size=300),
        st.text(any_char, max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
    ))
    return source, how["suffix"], serialize(entries, how) if content is None else content


def _parse(content: bytes, suffix: str) -> list[dict]:
    """The entries of a file that converted (the reader's own rules: UTF-8, a list, or lines split at \\n)."""
    text = content.decode("utf-8-sig")
    if suffix == ".jsonl":
        return [json.loads(line) for line in text.split("\n") if line.strip()]
    return json.loads(text)


@fuzz("chaos")
@given(drawn=chaos_file())
def test_any_file_converts_whole_or_fails_naming_the_file(root: Path, drawn: tuple[str, str, bytes]) -> None:
    source, suffix, content = drawn
    path, out, error = convert(root, "chaos", source, suffix, content)
    event(outcome(error))
    if error is not None:
        check_named(error, path)
        return
    assert out is not None
    assert set(out.records) == expected_ids(source, _parse(content, suffix))


# ---------------------------------------------------------------- broken image bytes: counted when read

SPEC = ImageSpec(shortest_edge=16, resize_hw=None, crop_hw=(16, 16), mean=(0.5,) * 3, std=(0.5,) * 3)


@fuzz("broken_images")
@given(source=st.sampled_from(["llava", "unifood"]), how=layout(), data=st.data())
def test_good_records_next_to_broken_images_are_all_kept_and_the_broken_counted(
    root: Path, source: str, how: dict, data: st.DataObject
) -> None:
    make = llava_entry if source == "llava" else unifood_entry
    entries = [data.draw(make(i, GOOD_IMAGES + BROKEN_IMAGES)) for i in range(data.draw(st.integers(1, 8)))]
    content = serialize(entries, how)
    path, out, error = convert(root, "broken_images", source, how["suffix"], content, how["threads"])
    assert error is None, f"broken image bytes failed the conversion: {str(error)[:1000]}"
    assert out is not None
    check_converted(source, entries, out, root)

    # The reader, split by split as training streams them: the text stage's row checks, then the image
    # stage's decoding; the skips go to the split's quality monitor.
    broken = {rid for rid, meta in out.records.items() if set(meta["source_images"]) & set(BROKEN_IMAGES)}
    event("no broken image" if not broken else "all broken" if broken == set(out.records) else "mixed")
    kept = set()
    for split, rows in out.rows.items():
        monitor = _Monitor(split, total=len(rows), max_bad_fraction=0.0)
        seen: Counter[str] = Counter()
        bad: list[tuple[str, str, str]] = []
        for row in rows:
            shard = shard_name(row["__url__"])
            seen[shard] += 1
            try:
                sample = parse_row(row)
                for image in sample.images:
                    assert image_pixels(image, SPEC, MAX_PIXELS).shape == (16, 16, 3)
            except BadRecord as exc:
                bad.append((shard, row["__key__"], exc.reason))
                continue
            kept.add(sample.meta["id"])
        failure = monitor.report(dict(seen), bad)
        report = monitor.snapshot()
        broken_here = [row for row in rows if json.loads(row["json"])["id"] in broken]
        assert report.rows_seen == len(rows)
        assert report.bad == ({"corrupt_image": len(broken_here)} if broken_here else {})
        assert (failure is None) == (not broken_here)  # max_bad_fraction=0: the first broken image stops it
        if failure:
            assert f"split {split!r}" in failure and "Worst shard: shard-" in failure
    assert kept == set(out.records) - broken, "a record with good images was skipped, or a broken one kept"


# ---------------------------------------------------------------- what the fuzzing found, pinned

TURNS = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A dish."}]
TEXT_ONLY = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]


def _llava(*entries: dict, ascii: bool = True) -> bytes:
    return json.dumps(list(entries), ensure_ascii=ascii).encode()


REGRESSIONS = {
    "byte-order mark": ("llava", ".json", BOM + _llava({"id": "a", "conversations": TEXT_ONLY}), None),
    "raw U+2028 and U+0085 in a JSON Lines string": (
        "llava", ".jsonl",
        b"\n".join(json.dumps({"id": i, "conversations": [{"from": "human", "value": f"a\u2028b\x85c{i}"},
                                                          {"from": "gpt", "value": "d\u2029e"}]},
                              ensure_ascii=False).encode() for i in range(3)), None),
    "task null is the default task": (
        "llava", ".json", _llava({"id": "a", "task": None, "conversations": TEXT_ONLY}), None),
    "empty image file": (
        "llava", ".json", _llava({"id": "a", "image": "bad/empty.png", "conversations": TURNS}),
        r"record 'a' \(entry #0 of .*\): image file 'bad/empty.png' is empty"),
    "no records": ("unifood", ".json", b"[]", "holds no records"),
    "float id": ("unifood", ".jsonl", b'{"id": 1.0, "image": "img/a.png", "ingredients": ["salt"]}',
                 r"entry #0: the record's 'id' must be a string or an integer, got a number|got float 1.0"),
    "lone surrogate escape": ("llava", ".json", b'[{"id": "a", "note": "x\\ud800", "conversations": []}]',
                              r"entry #0, field 'note', holds a lone UTF-16 surrogate"),
    "integer past 4300 digits": ("unifood", ".jsonl", b'{"id": ' + b"7" * 4400 + b"}",
                                 r"\(line 1\) cannot be read: it holds a number of more than 4300 digits"),
    "JSON Lines named .json": (
        "llava", ".json", b"\n".join(_llava({"id": i, "conversations": TEXT_ONLY})[1:-1] for i in range(2)),
        "name the file .jsonl"),
    "unsupported image type": ("unifood", ".json", json.dumps([{"id": "d", "image": "bad/note.txt",
                                                                 "recipe": "Boil."}]).encode(),
                               r"record 'd' \(entry #0 of .*\): image file 'bad/note.txt': image type 'txt'"),
}


@pytest.mark.parametrize("case", sorted(REGRESSIONS))
def test_regressions(root: Path, case: str) -> None:
    source, suffix, content, expected = REGRESSIONS[case]
    path, out, error = convert(root, "regressions", source, suffix, content)
    if expected is None:
        assert error is None, str(error)
        assert out is not None and out.records
        if "U+2028" in case:
            assert out.records["1"]["conversations"][0]["value"] == "a\u2028b\x85c1"
        if "task" in case:
            assert out.records["a"]["task"] == "chat"
        return
    assert error is not None and re.search(expected, check_named(error, path)), str(error)


def test_enough_files_were_converted() -> None:
    """The fuzz tests above (when they all ran) wrote and converted at least 1,000 input files."""
    if not set(EXAMPLES) <= set(FILES):
        pytest.skip(f"only some fuzz tests ran: {dict(FILES)}")
    print(f"converted input files: {dict(FILES)}, {sum(FILES.values())} in all")
    assert sum(FILES.values()) >= 1000, dict(FILES)
