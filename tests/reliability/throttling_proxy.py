"""An HTTP proxy on 127.0.0.1 that throttles an S3 endpoint the way S3 does under load (test helper).

It forwards HTTP/1.1 requests to a real server (here: moto) and, for a share of the requests, answers
``503 Slow Down`` with S3's XML error body itself or drops the connection in the middle of the request
(after its head, before the server saw anything), so the server's state is never touched by a faulted
request. Which requests are faulted: a seeded random share (``slow_down``, ``drop``) or every k-th request
(``every``, alternately answered 503 and dropped), or the next n requests (``fail_next``). What it did is counted (``requests``, ``throttled``,
``dropped``; ``faults`` by HTTP method and key) and logged (``log``).

One upstream connection per client connection, so keep-alive works both ways; request bodies are relayed
by Content-Length or chunked framing (aws-chunked bodies carry a Content-Length too), responses are
streamed through in pieces, never buffered whole. ``Expect: 100-continue`` is answered by the proxy.
"""

from __future__ import annotations

import random
import socket
import threading
from contextlib import suppress
from typing import BinaryIO

SLOW_DOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message>"
    b"<RequestId>THROTTLED</RequestId><HostId>throttling-proxy</HostId></Error>"
)
_PIECE = 64 * 1024


class ThrottlingProxy:
    """Forward 127.0.0.1:`port` to 127.0.0.1:`target_port`, faulting a share of the requests."""

    def __init__(self, port: int, target_port: int, *, slow_down: float = 0.0, drop: float = 0.0,
                 every: int | None = None, seed: int = 0) -> None:
        self.port, self.target_port = port, target_port
        self.slow_down, self.drop, self.every = slow_down, drop, every  # may be changed while running
        self.fail_next = 0  # answer the next n requests 503, whatever the settings above say
        self.requests = self.throttled = self.dropped = 0
        self.log: list[tuple[str, str, str]] = []  # (method, target, "ok" | "slow-down" | "drop")
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener = socket.create_server(("127.0.0.1", port))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def injected(self) -> int:
        return self.throttled + self.dropped

    def faults(self, methods: tuple[str, ...], since: int = 0, under: str = "") -> int:
        """Faults injected on requests `since` (an index into `log`) with one of these HTTP methods (reads:
        GET, HEAD; writes: PUT, POST) whose target contains `under` (e.g. a key prefix)."""
        with self._lock:
            return sum(action != "ok" and method in methods and under in target
                       for method, target, action in self.log[since:])

    def start(self) -> ThrottlingProxy:
        threading.Thread(target=self._accept, daemon=True, name="throttling-proxy").start()
        return self

    def stop(self) -> None:
        with self._lock:
            sockets, self._sockets = {self._listener, *self._sockets}, set()
        for sock in sockets:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with suppress(OSError):
                sock.close()

    # ------------------------------------------------------------ plumbing

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # stopped
            with self._lock:
                self._sockets.add(client)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _decide(self, method: str, target: str) -> str:
        with self._lock:
            self.requests += 1
            if self.fail_next > 0:
                self.fail_next -= 1
                action = "slow-down"
            elif self.every:
                nth, rest = divmod(self.requests, self.every)
                action = "ok" if rest else ("slow-down", "drop")[(nth - 1) % 2]
            else:
                draw = self._rng.random()
                action = "slow-down" if draw < self.slow_down else "drop" if draw < self.slow_down + self.drop else "ok"
            self.throttled += action == "slow-down"
            self.dropped += action == "drop"
            self.log.append((method, target, action))
            return action

    def _serve(self, client: socket.socket) -> None:
        upstream: socket.socket | None = None
        try:
            from_client = client.makefile("rb")
            while True:
                head = _read_head(from_client)
                if head is None:
                    return  # the client closed its keep-alive connection
                method, target = head[0].decode("latin-1").split(" ")[:2]
                headers = _headers(head)
                action = self._decide(method, target)
                if action == "drop":
                    return  # mid-request: the head was sent, no answer ever comes
                expects = headers.get("expect", "").lower() == "100-continue"
                if action == "slow-down":
                    if expects:  # the body will not be sent: answer and close
                        client.sendall(_slow_down(close=True))
                        return
                    _relay_body(from_client, headers, None)
                    client.sendall(_slow_down(close=False))
                    continue
                if upstream is None:
                    upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=30)
                    with self._lock:
                        self._sockets.add(upstream)
                    from_upstream = upstream.makefile("rb")
                if expects:
                    client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                upstream.sendall(b"".join(line for line in head if not line.lower().startswith(b"expect:")))
                _relay_body(from_client, headers, upstream)
                if not _relay_response(from_upstream, client, head_only=method == "HEAD"):
                    return
        except OSError:
            pass
        finally:
            for sock in (client, upstream):
                if sock is not None:
                    with self._lock:
                        self._sockets.discard(sock)
                    with suppress(OSError):
                        sock.close()


def _slow_down(close: bool) -> bytes:
    return (
        b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
        + f"Content-Length: {len(SLOW_DOWN_BODY)}\r\n".encode()
        + (b"Connection: close\r\n" if close else b"")
        + b"\r\n" + SLOW_DOWN_BODY
    )


def _read_head(stream: BinaryIO) -> list[bytes] | None:
    """The start line and header lines (each with its CRLF) and the empty line; None at a clean EOF."""
    lines: list[bytes] = []
    while True:
        line = stream.readline(65536)
        if not line:
            if lines:
                raise ConnectionError("connection closed inside a message head")
            return None
        if not lines and line in (b"\r\n", b"\n"):
            continue  # stray CRLF between messages
        lines.append(line)
        if line in (b"\r\n", b"\n"):
            return lines


def _headers(head: list[bytes]) -> dict[str, str]:
    out = {}
    for line in head[1:]:
        name, sep, value = line.decode("latin-1").partition(":")
        if sep:
            out[name.strip().lower()] = value.strip()
    return out


def _copy(source: BinaryIO, sink: socket.socket | None, size: int) -> None:
    while size > 0:
        piece = source.read(min(size, _PIECE))
        if not piece:
            raise ConnectionError("connection closed inside a message body")
        if sink is not None:
            sink.sendall(piece)
        size -= len(piece)


def _relay_body(source: BinaryIO, headers: dict[str, str], sink: socket.socket | None) -> None:
    """Copy one message body (Content-Length or chunked framing) from `source` to `sink` (None: discard)."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size_line = source.readline(65536)
            if sink is not None:
                sink.sendall(size_line)
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:  # the trailer section ends with an empty line
                while (line := source.readline(65536)) not in (b"\r\n", b"\n", b""):
                    if sink is not None:
                        sink.sendall(line)
                if sink is not None:
                    sink.sendall(b"\r\n")
                return
            _copy(source, sink, size + 2)  # the chunk and its CRLF
    _copy(source, sink, int(headers.get("content-length", "0")))


def _relay_response(source: BinaryIO, client: socket.socket, head_only: bool) -> bool:
    """Stream one response (after any 1xx) to the client; False when the connection must close after it."""
    while True:
        head = _read_head(source)
        if head is None:
            raise ConnectionError("the server closed the connection before answering")
        client.sendall(b"".join(head))
        status = int(head[0].split(b" ")[1])
        if status >= 200:
            break
    headers = _headers(head)
    keep_alive = headers.get("connection", "").lower() != "close" and not head[0].startswith(b"HTTP/1.0")
    if head_only or status in (204, 304):
        return keep_alive
    if "chunked" in headers.get("transfer-encoding", "").lower() or "content-length" in headers:
        _relay_body(source, headers, client)
        return keep_alive
    while piece := source.read1(_PIECE):  # no framing: the body runs until the server closes
        client.sendall(piece)
    return False
