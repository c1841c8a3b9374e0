"""Readers that turn raw LLaVA-format and UniFood-style inputs into shard records.

LLaVA format (a JSON list, or JSON Lines)::

    {"id": "000001", "image": "coco/0001.jpg" | ["a.jpg", "b.jpg"] | absent (text-only),
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"}, {"from": "gpt", "value": "..."}]}

One ``<image>`` placeholder per image, in order. Optional ``task`` and ``answer_fields``
are kept; otherwise the task is ``chat`` and the reference is the last answer.

UniFood style (a JSON list, or JSON Lines)::

    {"id": "dish-1", "image": "dish-1.jpg", "ingredients": ["rice", "egg"],
     "recipe": "Boil the rice. ..." (or a list of steps),
     "nutrition": {"mass": 250, "cal": 380, "fat": 12, "protein": 20, "carb": 45}}

Each entry becomes up to three instruction records, one per family whose field
is present: ``items`` (ingredient set), ``description`` (recipe) and ``numeric``
(nutrition, answered as ``mass: 250.0, cal: 380.0, fat: 12.0, protein: 20.0, carb: 45.0``:
grams, kcal, grams, grams, grams). The structured ground truth goes to ``answer_fields``.

Image paths are relative to the image root (``data.image_root``, default: the
folder of the input file). A path that leaves the root (``../../etc/passwd``, an
absolute path elsewhere, or a symlink inside the root that points out of it) is
refused, and a missing file is an error naming the record and the path: a
dataset is never written with silent holes.

Every record is checked here against the shard writer's own rules (turns, ``<image>``
placeholders, image types, text that is valid Unicode), so a bad entry ends the run
with a `RecordError` naming the input file, the entry (index and id) and the field,
never with a traceback from deeper down. Records are not skipped: one bad entry
fails the file, so a dataset is never written with holes nobody asked for.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import posixpath
import re
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar
from urllib.parse import urlsplit

from components import storage
from components.config import StorageSection
from components.data.shards import (
    IMAGE_PLACEHOLDER,
    RecordError,
    _image_ext,
    _placeholders,
    check_conversations,
)

T = TypeVar("T")
R = TypeVar("R")

NUTRITION_FIELDS = ("mass", "cal", "fat", "protein", "carb")
UNIFOOD_QUESTIONS = {
    "items": "What are the ingredients of this dish? List them separated by commas.",
    "description": "How is this dish prepared? Write the recipe.",
    "numeric": (
        "Estimate the nutrition of this dish. Answer as 'mass: G, cal: K, fat: G, protein: G, carb: G' "
        "(grams and kilocalories)."
    ),
}
# Only an escape can put a lone UTF-16 surrogate into parsed JSON (the UTF-8 decoder refuses encoded ones).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _parse_json(text: str, uri: str, line: int | None = None) -> object:
    """One JSON document (the file, or `line` of a JSON Lines file); a failure names the file and where."""
    at = "" if line is None else f" (line {line})"
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        where = f"line {line or exc.lineno} column {exc.colno}"
        hint = " (one record per line is JSON Lines: name the file .jsonl)" if exc.msg == "Extra data" else ""
        raise RecordError(f"input file {uri} is not valid JSON at {where}: {exc.msg}{hint}; fix the file "
                          "(a JSON list of records, or one record per line in a .jsonl file)") from None
    except ValueError:  # valid JSON, but an integer of more than 4300 digits (Python's limit on reading one)
        raise RecordError(f"input file {uri}{at} cannot be read: it holds a number of more than 4300 digits; "
                          "write it as a string") from None
    except RecursionError:
        raise RecordError(f"input file {uri}{at} cannot be read: its lists or objects nest too deep "
                          "(thousands of levels); flatten them") from None


def _json_type(value: object) -> str:
    """What JSON calls the type of a parsed value."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _check_text(entry: dict, n: int, uri: str) -> None:
    """Refuse an entry holding a lone surrogate escape (``"\\ud800"``): the shard writer cannot encode it."""
    for key, value in entry.items():
        try:
            json.dumps({key: value}, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise RecordError(
                f"input file {uri}: entry #{n}, field {key!r:.80}, holds a lone UTF-16 surrogate escape "
                "(\\ud800-\\udfff without its pair), which is not text; fix or remove that character"
            ) from None
        except RecursionError:
            raise RecordError(f"input file {uri}: entry #{n}, field {key!r:.80}, nests too deep") from None


def load_entries(uri: str, cfg: StorageSection | None = None) -> list[dict]:
    """The entries of a JSON list or JSON Lines file, each checked to be an object."""
    try:
        data = storage.read_bytes(uri, cfg)
    except FileNotFoundError:
        raise FileNotFoundError(f"input file {uri} not found (set data.input / --input to the JSON file)") from None
    try:
        text = data.decode("utf-8-sig")  # a leading byte-order mark (some editors write one) is not content
    except UnicodeDecodeError as exc:  # exc.object: the bytes after a byte-order mark
        line = exc.object.count(b"\n", 0, exc.start) + 1
        offset = exc.start + len(data) - len(exc.object)
        raise RecordError(
            f"input file {uri} is not valid JSON: it is not UTF-8 text (line {line}: {exc.reason} at byte "
            f"{offset}, {exc.object[exc.start:exc.start + 1]!r}); save it as UTF-8"
        ) from None
    if uri.endswith(".jsonl"):
        # Lines end at "\n" only: str.splitlines would also cut at U+2028, U+0085 and others,
        # which JSON allows unescaped inside strings.
        lines = [(i, line) for i, line in enumerate(text.split("\n"), 1) if line.strip()]
        entries = [_parse_json(line, uri, i) for i, line in lines]
    else:
        entries = _parse_json(text, uri)
    if not isinstance(entries, list):
        raise RecordError(
            f"input file {uri} must hold a JSON list of records (or JSON Lines ending in .jsonl), "
            f"got {_json_type(entries)}"
        )
    if not entries:
        raise RecordError(f"input file {uri} holds no records; point data.input at the dataset's JSON file")
    surrogates = _SURROGATE_ESCAPE.search(data) is not None
    for n, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise RecordError(
                f"input file {uri}: entry #{n} must be a JSON object (one record), got {_json_type(entry)}"
            )
        if surrogates:
            _check_text(entry, n, uri)
    return entries


def file_digest(uri: str, cfg: StorageSection | None = None) -> str:
    """sha256 of a file's bytes (inputs fingerprint for re-use checks)."""
    return hashlib.sha256(storage.read_bytes(uri, cfg)).hexdigest()


def default_image_root(input_uri: str) -> str:
    """The folder that holds the input file."""
    if storage.is_remote(input_uri):
        return input_uri.rstrip("/").rsplit("/", 1)[0]
    return os.path.dirname(os.path.abspath(input_uri))


def entry_id(entry: dict, n: int, uri: str) -> str:
    """The entry's id as a string: a non-empty string or an integer (7 and "7" are the same id)."""
    rid = entry.get("id")
    if rid is None or (isinstance(rid, str) and not rid.strip()):
        raise RecordError(f"input file {uri}: entry #{n} has no 'id'; every record needs a unique id")
    if isinstance(rid, bool) or not isinstance(rid, str | int):
        raise RecordError(
            f"input file {uri}: entry #{n}: the record's 'id' must be a string or an integer, "
            f"got {_json_type(rid)} {rid!r:.80}"
        )
    return str(rid)


def record_where(rid: str, n: int, uri: str) -> str:
    """How errors name a record: its id (shortened) and its position in the input file."""
    return f"record {rid!r:.80} (entry #{n} of {uri})"


def _text_field(entry: dict, name: str, default: str, where: str) -> str:
    """An optional string field (absent or null: `default`); anything but a non-empty string is refused."""
    value = entry.get(name)
    if value is None:
        return default
    if not isinstance(value, str) or not value.strip():
        raise RecordError(f"{where}: {name!r} must be a non-empty string, got {value!r:.80}")
    return value


def assign_split(record_id: str, seed: int, val_fraction: float, test_fraction: float) -> str:
    """train / validation / test by a hash of (seed, id): stable under reordering and appending."""
    u = int(hashlib.sha256(f"{seed}\0{record_id}".encode()).hexdigest()[:16], 16) / 2.0**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "validation"
    return "train"


# ---------------------------------------------------------------- images


def safe_image_uri(root: str, rel: object, where: str) -> str:
    """The URI of an image path inside `root`; paths that escape the root are refused."""
    if not isinstance(rel, str) or not rel.strip() or "\x00" in rel:
        raise RecordError(f"{where}: 'image' must be a non-empty path string, got {rel!r:.80}")
    if storage.is_remote(root):
        parts = urlsplit(root)
        base = posixpath.normpath("/" + parts.netloc + parts.path)
        if "://" in rel:
            raise RecordError(f"{where}: image path {rel!r:.200} must be relative to the image root {root}")
        target = posixpath.normpath(posixpath.join(base, rel))
        inside = target.startswith(base.rstrip("/") + "/")
        resolved = f"s3:/{target}"
    else:
        # Symlinks are resolved on both sides: a link inside the root that points elsewhere is outside.
        base = os.path.realpath(root)
        target = os.path.realpath(rel if os.path.isabs(rel) else os.path.join(base, rel))
        inside = target.startswith(base.rstrip(os.sep) + os.sep)
        resolved = target
    if not inside:
        raise RecordError(
            f"{where}: image path {rel!r:.200} escapes the image root {root}; refusing to read it "
            "(image paths must be relative to data.image_root and stay inside it)"
        )
    return resolved


def load_images(paths: list[object], root: str, where: str, cfg: StorageSection | None) -> list[tuple[str, bytes]]:
    """(extension, bytes) of each image path, read through storage; a missing file names record and path."""
    images = []
    for rel in paths:
        uri = safe_image_uri(root, rel, where)
        ext = _image_ext(os.path.splitext(str(rel))[1] or "jpg", f"{where}: image file {str(rel)[:200]!r}")
        try:
            data = storage.read_bytes(uri, cfg)
        except (FileNotFoundError, IsADirectoryError):
            raise RecordError(
                f"{where}: image file {rel!r:.200} not found under the image root {root} "
                "(set data.image_root to the folder the image paths are relative to)"
            ) from None
        except storage.StorageError:
            raise  # the store itself failed (retries exhausted): not this record's fault
        except OSError as exc:  # this path cannot be read: too long, a directory, not permitted
            raise RecordError(f"{where}: image file {str(rel)[:200]!r} cannot be read ({str(exc)[:200]})") from None
        if not data:  # the writer refuses it too, but without naming the input file and entry
            raise RecordError(f"{where}: image file {str(rel)[:200]!r} is empty (0 bytes); replace the file")
        images.append((ext, data))
    return images


def _image_paths(entry: dict, where: str) -> list[object]:
    image = entry.get("image")
    if image is None:
        return []
    if isinstance(image, list):
        if not image:
            raise RecordError(f"{where}: 'image' is an empty list; drop the field for a text-only record")
        return image
    return [image]


# ---------------------------------------------------------------- LLaVA


def ordered_map(fn: Callable[[T], R], items: Iterable[T], threads: int, window: int = 256) -> Iterator[R]:
    """fn over items on a thread pool, results in input order, at most `window` in flight.

    Reading images is I/O bound (one GET per image on object storage), so a few
    threads turn hours of sequential requests into minutes; order is kept so the
    shards stay deterministic, and the first error is raised where it occurs.
    """
    if threads <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="duet-read") as pool:
        pending: deque[Future[R]] = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def llava_record(
    numbered: tuple[int, dict], uri: str, image_root: str, cfg: StorageSection | None = None, task: str | None = None
) -> dict:
    """The shard record of one numbered LLaVA entry, images read; `task` overrides the entry's own."""
    n, entry = numbered
    rid = entry_id(entry, n, uri)
    where = record_where(rid, n, uri)
    if "conversations" not in entry:
        raise RecordError(f"{where}: missing 'conversations' (a list of from/value turns)")
    conversations = check_conversations(entry["conversations"], where)
    paths = _image_paths(entry, where)
    if _placeholders(conversations) != len(paths):
        raise RecordError(
            f"{where}: {len(paths)} image(s) in 'image' but {_placeholders(conversations)} "
            f"'{IMAGE_PLACEHOLDER}' placeholder(s) in 'conversations'; put exactly one '{IMAGE_PLACEHOLDER}' "
            "in the human turns per image"
        )
    answer_fields = entry.get("answer_fields") or {"reference": conversations[-1]["value"]}
    if not isinstance(answer_fields, dict):
        raise RecordError(f"{where}: 'answer_fields' must be an object (field -> ground truth), "
                          f"got {_json_type(answer_fields)}")
    return {
        "id": rid,
        "task": task or _text_field(entry, "task", "chat", where),
        "conversations": conversations,
        "answer_fields": answer_fields,
        "source_images": [str(p) for p in paths],
        "images": load_images(paths, image_root, where, cfg),
    }


def llava_records(
    entries: Iterable[tuple[int, dict]], uri: str, image_root: str, cfg: StorageSection | None = None,
    task: str | None = None, threads: int = 1,
) -> Iterator[dict]:
    """Shard records of numbered LLaVA entries, in order (images read on `threads` threads)."""
    yield from ordered_map(lambda numbered: llava_record(numbered, uri, image_root, cfg, task), entries, threads)


# ---------------------------------------------------------------- UniFood


def _no_placeholder(text: str, field: str, where: str) -> str:
    """UniFood text becomes an answer, and an answer may not hold an image placeholder."""
    if IMAGE_PLACEHOLDER in text:
        raise RecordError(
            f"{where}: {field!r} contains {IMAGE_PLACEHOLDER!r}; remove it (the question shows the image once)"
        )
    return text


def _recipe_text(recipe: object, where: str) -> str:
    if isinstance(recipe, list) and all(isinstance(s, str) for s in recipe):
        return _no_placeholder(" ".join(s.strip() for s in recipe if s.strip()), "recipe", where)
    if isinstance(recipe, str):
        return _no_placeholder(recipe.strip(), "recipe", where)
    raise RecordError(f"{where}: 'recipe' must be a string or a list of step strings")


def _amount(value: object) -> float | None:
    """`value` as a finite float >= 0, or None (booleans, strings, NaN, negatives, ints past float range)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) and number >= 0 else None


def _nutrition(entry: dict, where: str) -> dict[str, float] | None:
    source = entry.get("nutrition")
    if source is None and any(k in entry for k in NUTRITION_FIELDS):
        source = {k: entry.get(k) for k in NUTRITION_FIELDS}
    if source is None:
        return None
    if not isinstance(source, dict):
        raise RecordError(f"{where}: 'nutrition' must be an object with {', '.join(NUTRITION_FIELDS)}")
    values = {}
    for name in NUTRITION_FIELDS:
        value = _amount(source.get(name))
        if value is None:
            raise RecordError(
                f"{where}: nutrition field {name!r} must be a finite number >= 0 (grams, kcal), "
                f"got {source.get(name)!r:.80}"
            )
        values[name] = round(value, 1)
    return values


def format_nutrition(values: dict[str, float]) -> str:
    return ", ".join(f"{k}: {values[k]:.1f}" for k in NUTRITION_FIELDS)


def unifood_family_records(
    numbered: tuple[int, dict], uri: str, image_root: str, cfg: StorageSection | None = None
) -> list[dict]:
    """Up to three instruction records (items, description, numeric) of one numbered UniFood entry."""
    n, entry = numbered
    rid = entry_id(entry, n, uri)
    where = record_where(rid, n, uri)
    paths = _image_paths(entry, where)
    if len(paths) != 1:
        raise RecordError(f"{where}: a UniFood record needs exactly one 'image', got {len(paths)}")
    families: list[tuple[str, str, dict]] = []
    ingredients = entry.get("ingredients")
    if ingredients is not None:
        if not isinstance(ingredients, list) or not all(isinstance(i, str) and i.strip() for i in ingredients):
            raise RecordError(f"{where}: 'ingredients' must be a list of non-empty strings")
        if ingredients:
            items = [_no_placeholder(i.strip(), "ingredients", where) for i in ingredients]
            families.append(("items", ", ".join(items), {"items": items}))
    if entry.get("recipe") is not None:
        text = _recipe_text(entry["recipe"], where)
        if text:
            families.append(("description", text, {"reference": text}))
    nutrition = _nutrition(entry, where)
    if nutrition is not None:
        families.append(("numeric", format_nutrition(nutrition), nutrition))
    if not families:
        raise RecordError(f"{where}: no 'ingredients', 'recipe' or 'nutrition'; nothing to learn from it")
    images = load_images(paths, image_root, where, cfg)
    return [
        {
            "id": f"{rid}-{task}",
            "source_id": rid,
            "task": task,
            "conversations": [
                {"from": "human", "value": f"<image>\n{UNIFOOD_QUESTIONS[task]}"},
                {"from": "gpt", "value": answer},
            ],
            "answer_fields": fields,
            "source_images": [str(paths[0])],
            "images": images,
        }
        for task, answer, fields in families
    ]


def unifood_records(
    entries: Iterable[tuple[int, dict]], uri: str, image_root: str, cfg: StorageSection | None = None,
    threads: int = 1,
) -> Iterator[dict]:
    """The family records of numbered UniFood entries, in order (images read on `threads` threads)."""
    for family in ordered_map(lambda numbered: unifood_family_records(numbered, uri, image_root, cfg), entries,
                              threads):
        yield from family
