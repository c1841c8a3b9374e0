"""The errors a user fixes outside the code, and how to find one inside the wrappers Ray puts around it.

Every such error derives from `DuetError`: its message names the file, key or
service and says what to do, so a pipeline script ends it with one line
(`[duet] error: ...`) and an exit status instead of a traceback. Anything else
is a bug and keeps its traceback.

Errors raised inside Ray tasks, actors and training workers reach the driver
wrapped (a `RayTaskError` holding the original as `cause`, Ray Train's
`WorkerGroupError` holding one per rank in `worker_failures`, its
`ControllerError` holding `controller_failure`); `find_user_error` looks
through those by attribute, so this module imports nothing of Ray.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator


class DuetError(Exception):
    """A problem the user can fix (input, config, a service); the message says what and how."""

    exit_code = 1


class UsageError(DuetError):
    """Bad arguments or config: found before any work is done (exit status 2, as argparse uses)."""

    exit_code = 2


class ArtifactError(DuetError, ValueError):
    """A stage artifact that is missing, unreadable, incomplete or from another model; names its path."""


class ClusterTooSmallError(UsageError):
    """The Ray cluster cannot hold what a stage or an evaluation needs at once, and cannot grow to."""


DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})  # no space, or over quota: retrying cannot help


class StorageFullError(DuetError, OSError):
    """The filesystem under a path duet writes ran out of space (or quota); names the path and the free space."""


def _nested(exc: BaseException) -> Iterator[BaseException]:
    """The exceptions wrapped inside `exc`: Ray's cause, Ray Train's per-worker and controller failures."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        yield cause
    failures = getattr(exc, "worker_failures", None)
    if isinstance(failures, dict):
        yield from (e for _, e in sorted(failures.items()) if isinstance(e, BaseException))
    controller = getattr(exc, "controller_failure", None)
    if isinstance(controller, BaseException):
        yield controller
    if exc.__cause__ is not None:
        yield exc.__cause__


def find_user_error(exc: BaseException, depth: int = 8) -> DuetError | None:
    """The innermost `DuetError` in `exc` or what it wraps, or None when the failure is not the user's to fix.

    A wrapper that is itself a DuetError subclass (Ray makes `RayTaskError(DuetError)` types) is looked
    through first, so the message is the original one, without Ray's traceback text.
    """
    if depth == 0:
        return None
    for inner in _nested(exc):
        found = find_user_error(inner, depth - 1)
        if found is not None:
            return found
    return exc if isinstance(exc, DuetError) else None


def find_disk_full(exc: BaseException, depth: int = 8) -> OSError | None:
    """The "no space left" (or quota) OSError in `exc` or what it wraps, or None."""
    if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
        return exc
    if depth == 0:
        return None
    for inner in _nested(exc):
        found = find_disk_full(inner, depth - 1)
        if found is not None:
            return found
    return None
