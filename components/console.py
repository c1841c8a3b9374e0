"""What the person at the terminal reads: step lines, and how a pipeline script ends.

Everything goes to standard output with a `[duet]` prefix (under `ray job submit`
that is the job log), errors to standard error. Kept free of heavy imports so
that `--help` and config errors answer at once.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from components.errors import find_user_error

PREFIX = "[duet]"


def say(message: str) -> None:
    """One progress line for the person at the terminal (and the job log under `ray job submit`)."""
    print(f"{PREFIX} {message}", flush=True)


def error(message: str) -> None:
    """A user-facing error line on standard error."""
    print(f"{PREFIX} error: {message}", file=sys.stderr, flush=True)


def run_script(main: Callable[[], object]) -> int:
    """Run a pipeline's `main` and return its exit status.

    A problem the user fixes outside the code (`components.errors.DuetError`, also when Ray
    delivers it wrapped from a worker) ends with its message and status 1 (2 for bad arguments or
    config) instead of a traceback; Ctrl-C ends with status 130; anything else is a bug and raises.
    An integer returned by `main` is the status.
    """
    try:
        result = main()
    except KeyboardInterrupt:
        error("interrupted; re-run the same command to resume from the last finished step")
        return 130
    except Exception as exc:
        found = find_user_error(exc)
        if found is None:
            raise
        error(str(found))
        return found.exit_code
    return result if isinstance(result, int) and not isinstance(result, bool) else 0
