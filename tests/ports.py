"""Ports for the servers tests start, chosen outside the kernel's ephemeral range.

A port the kernel hands out for `bind(("127.0.0.1", 0))` is free at that moment only: the
kernel hands the same range to every outgoing connection on the machine, and a server
started seconds later (a Ray head's dashboard agent, an MLflow server) can find it taken,
after which a `ray start --head --block` stops the whole head. Ports below the ephemeral
range are never given to outgoing connections, so a free one stays free until a test binds it.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

# Ray's workers take 10002-19999 by default (--min-worker-port/--max-worker-port).
_LOWEST = 20000
_RANDOM = random.SystemRandom()  # never the global generator a test may have seeded


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now and no outgoing connection will take."""
    highest = max(_ephemeral_start() - 1, _LOWEST + 1000)
    for _ in range(200):
        port = _RANDOM.randint(_LOWEST, highest)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port between {_LOWEST} and {highest} on 127.0.0.1")
