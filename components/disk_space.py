"""A full disk, said in one line: which path, how much space is left, what is still intact, what to do."""

from __future__ import annotations

import os
import shutil

from components.errors import StorageFullError


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def free_space(path: str) -> str:
    """"N free of M" for the filesystem holding `path` (or its nearest existing parent); "" when unknown."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    try:
        usage = shutil.disk_usage(probe)
    except OSError:
        return ""
    return f"{_size(usage.free)} free of {_size(usage.total)}"


def storage_full(what: str, path: str, kept: str) -> StorageFullError:
    """The error for running out of space while writing `what` under local `path`; `kept` says what is intact."""
    space = free_space(path)
    return StorageFullError(
        f"no space left on the filesystem of {path} while writing {what}" + (f" ({space})" if space else "")
        + f"; {kept}: free space there (or point the path elsewhere) and re-run the same command"
    )
