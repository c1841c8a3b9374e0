"""Decoding and validation of one raw WebDataset row into a clean sample, or a reason to skip it.

A row is what a WebDataset reader yields for one key: ``__key__``, ``__url__`` (the
shard), ``json`` (bytes) and the image members named by the JSON's ``images`` list
(bytes). Every problem maps to one skip reason, counted by the pipeline:

=================  =============================================================
corrupt_image      zero-byte, truncated or undecodable image; more pixels than the limit
bad_json           the JSON member is not UTF-8 JSON holding an object
missing_field      no JSON member, no conversations, or a listed image member absent
empty_answer       an assistant turn with no text (or nothing left to learn from)
too_long           longer than max_length after the image placeholders are expanded
path_traversal     a key or image member name that tries to leave the shard ("../", "/abs")
image_mismatch     number of ``<image>`` placeholders differs from the number of images
bad_conversation   turns that do not alternate human/gpt
=================  =============================================================

Images in unusual modes are converted to RGB: transparency (RGBA, LA, PA, P with a
transparent colour) is composited on white, 16/32-bit greyscale is scaled to 8 bits,
CMYK, palette, 1-bit and the rest go through PIL's conversion.
"""

from __future__ import annotations

import io
import json
import re
import struct
import warnings
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

REASONS = (
    "corrupt_image", "bad_json", "missing_field", "empty_answer", "too_long", "path_traversal",
    "image_mismatch", "bad_conversation",
)
_MEMBER = re.compile(r"^(?:\d+\.)?[a-z0-9]+$")
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, Image.DecompressionBombError)


class BadRecord(Exception):
    """A row to skip: `reason` is one of REASONS, `detail` says what was wrong."""

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown skip reason {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class RawSample:
    """A row whose JSON and member names are valid; images still encoded."""

    key: str
    shard: str
    meta: dict[str, Any]
    conversations: list[dict]
    images: list[bytes]


def _present(value: Any) -> bool:
    """Missing members show up as None or NaN (pandas) in a batch."""
    return isinstance(value, bytes | bytearray | memoryview)


def check_key(key: Any) -> str:
    """A sample key must be a plain relative name: no '..' segment, no absolute path, no backslash."""
    if not isinstance(key, str) or not key:
        raise BadRecord("missing_field", "row has no __key__")
    parts = key.split("/")
    if key.startswith(("/", "\\")) or "\\" in key or ".." in parts or re.match(r"^[A-Za-z]:", key):
        raise BadRecord("path_traversal", f"key {key!r} points outside the shard")
    return key


def parse_json(data: Any) -> dict[str, Any]:
    if not _present(data):
        raise BadRecord("missing_field", "no .json member")
    raw = bytes(data)
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # not UTF-8 or JSON, an int over 4300 digits, too deep
        raise BadRecord("bad_json", f"unparseable JSON ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(meta, dict):
        raise BadRecord("bad_json", f"JSON holds a {type(meta).__name__}, not an object")
    # A "\\ud800"-style escape decodes to a lone surrogate, which no tokenizer accepts (only escapes can
    # produce one: the UTF-8 decoder refuses encoded surrogates).
    if b"\\u" in raw:
        try:
            json.dumps(meta, ensure_ascii=False).encode("utf-8")
        except (UnicodeEncodeError, RecursionError) as exc:
            raise BadRecord("bad_json", f"JSON holds a lone UTF-16 surrogate escape, not valid text ({exc})") from None
    return meta


def parse_row(row: dict[str, Any]) -> RawSample:
    """Check a row's key, JSON and member names; collect the image bytes in placeholder order."""
    key = check_key(row.get("__key__"))
    meta = parse_json(row.get("json"))
    conversations = meta.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise BadRecord("missing_field", "JSON has no 'conversations' list")
    names = meta.get("images", [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise BadRecord("missing_field", "'images' must be a list of member suffixes")
    images = []
    for name in names:
        if not _MEMBER.match(name):
            raise BadRecord("path_traversal", f"image member {name!r} is not a plain suffix like 'png' or '0.jpg'")
        data = row.get(name)
        if not _present(data):
            raise BadRecord("missing_field", f"image member {key}.{name} is missing")
        if len(data) == 0:
            raise BadRecord("corrupt_image", f"image member {key}.{name} is empty (0 bytes)")
        images.append(bytes(data))
    return RawSample(key=key, shard=str(row.get("__url__", "")), meta=meta, conversations=conversations, images=images)


# ---------------------------------------------------------------- images


def _composite_on_white(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    background = Image.new("RGB", rgba.size, (255, 255, 255))
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB version of any PIL image mode (see the module docstring for the rules)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        return _composite_on_white(image)
    if mode.startswith("I") or mode == "F":
        values = np.asarray(image, dtype=np.float64)
        scale = 257.0 if (mode.startswith("I;16") or (mode == "I" and values.max(initial=0) > 255)) else 1.0
        grey = np.clip(np.rint(values / scale), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    return image.convert("RGB")


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode and fully load an image as RGB; any failure (or a decompression bomb) is corrupt_image."""
    if not data:
        raise BadRecord("corrupt_image", "zero-byte image")
    # PIL's own guard (warns above the limit, refuses above twice the limit) is a process global:
    # set it for this decode and put the previous value back, so other code in the process is unaffected.
    previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > max_pixels:
                raise BadRecord("corrupt_image", f"{image.width}x{image.height} exceeds the {max_pixels}-pixel limit")
            image.load()
            return to_rgb(image)
    except BadRecord:
        raise
    except Image.DecompressionBombWarning as exc:
        raise BadRecord("corrupt_image", f"decompression bomb ({exc})") from None
    except _DECODE_ERRORS as exc:
        raise BadRecord("corrupt_image", f"cannot decode image ({type(exc).__name__}: {exc})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def validate_row(row: dict[str, Any], max_pixels: int) -> tuple[RawSample, list[Image.Image]]:
    """A row's checked sample and its decoded RGB images; raises BadRecord with the skip reason."""
    sample = parse_row(row)
    return sample, [decode_image(data, max_pixels) for data in sample.images]
