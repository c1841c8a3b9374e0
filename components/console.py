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


def warn(message: str) -> None:
    """Something the user should know that did not stop the run (standard error)."""
    print(f"{PREFIX} warning: {message}", file=sys.stderr, flush=True)


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


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class StepProgress:
    """A training stage's progress as the driver hears it: step/total, loss, learning rate, tokens/s, ETA.

    On a terminal one live line is redrawn at every step; elsewhere (a file, CI, `ray job logs`) a
    line is printed every `every` steps and at the last step, never redrawn.
    """

    def __init__(self, name: str, every: int, live: bool | None = None) -> None:
        self.name = name
        self.every = max(1, every)
        self.live = sys.stdout.isatty() if live is None else live
        self._drawn = False

    def line(self, row: dict[str, float]) -> str:
        """The progress text of one step's metrics row (from components.train.loop)."""
        step, total = int(row["step"]), int(row.get("total_steps", 0))
        lr = row.get("lr_adapter") or row.get("lr_projector_vce", 0.0)
        text = (f"{self.name} step {step}/{total} loss {row.get('loss', float('nan')):.4f} lr {lr:.2e} "
                f"tokens/s {row.get('tokens_per_s', 0.0):.0f} eta {_duration(row.get('eta_s', 0.0))}")
        if "mfu" in row:  # where the device's peak is known (components/train/flops.py)
            text += f" mfu {100 * row['mfu']:.1f}%"
        if "val_loss" in row:
            text += f" val_loss {row['val_loss']:.4f}"
        return text

    def update(self, row: dict[str, float]) -> None:
        step, total = int(row["step"]), int(row.get("total_steps", 0))
        if self.live:
            print(f"\r{PREFIX} {self.line(row)}\033[K", end="", flush=True)
            self._drawn = True
            if step >= total:
                self.close()
        elif step % self.every == 0 or step >= total:
            say(self.line(row))

    def close(self) -> None:
        """End the live line (so the next message starts on a fresh one)."""
        if self._drawn:
            print(flush=True)
            self._drawn = False


class CountProgress:
    """Progress through a known number of items (samples of an evaluation).

    On a terminal one live line; elsewhere a line at each quarter, never redrawn.
    """

    def __init__(self, label: str, total: int, live: bool | None = None) -> None:
        self.label = label
        self.total = max(1, total)
        self.live = sys.stdout.isatty() if live is None else live
        self._quarter = 0

    def update(self, done: int) -> None:
        text = f"{self.label}: {done}/{self.total} samples"
        if self.live:
            print(f"\r{PREFIX} {text}\033[K", end="" if done < self.total else "\n", flush=True)
            return
        quarter = min(4, 4 * done // self.total)
        if quarter > self._quarter:
            self._quarter = quarter
            say(text)
