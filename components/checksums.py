"""Sizes and sha256 digests of the files in a folder, recorded when it is written and checked before it is read.

Stage artifacts (artifact.json) and training checkpoints (one manifest per rank) record them, so a
truncated, emptied, bit-flipped or incomplete copy is refused naming the file instead of being loaded.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

FileRecords = dict[str, dict[str, Any]]  # relative posix path -> {"size": bytes, "sha256": hex digest}


def sha256_file(file: str | Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def file_records(folder: Path, skip: Iterable[str] = ()) -> FileRecords:
    """Size and sha256 of every file under `folder` (recursively) except those named in `skip`."""
    skipped = set(skip)
    return {
        file.relative_to(folder).as_posix(): {"size": file.stat().st_size, "sha256": sha256_file(file)}
        for file in sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in skipped)
    }


def mismatches(folder: Path, records: FileRecords) -> list[str]:
    """What differs between `folder` and `records`, one phrase per file (empty when every file matches).

    Sizes are compared first, so a truncated or emptied file is named without reading it."""
    problems = []
    for rel, record in sorted(records.items()):
        file = folder / rel
        if not file.is_file():
            problems.append(f"{rel} is missing")
        elif (size := file.stat().st_size) != record.get("size"):
            problems.append(f"{rel} has {size} bytes, {record.get('size')} were written")
        elif sha256_file(file) != record.get("sha256"):
            problems.append(f"{rel} does not match the sha256 recorded when it was written")
    return problems
