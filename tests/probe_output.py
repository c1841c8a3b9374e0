"""Reading a probe subprocess's JSON answer out of stdout that Ray or a library may also write to.

Ray prints warnings to a driver's stdout at any time (lagging heartbeats, for one), even after the probe's own
line, so a probe marks its answer and the test looks for the mark instead of trusting the last line.
"""

from __future__ import annotations

import json
from typing import Any

PROBE_MARK = "duet-probe-json: "


def probe_json(stdout: str) -> Any:
    """The JSON value of the last line a probe wrote as ``print(PROBE_MARK + json.dumps(value))``."""
    answers = [line[len(PROBE_MARK):] for line in stdout.splitlines() if line.startswith(PROBE_MARK)]
    assert answers, f"the probe wrote no '{PROBE_MARK.strip()}' line; its stdout ends:\n{stdout[-2000:]}"
    return json.loads(answers[-1])
