"""A TCP proxy on 127.0.0.1 that cuts the network path to a service on demand (test helper).

It sits in front of a real server (here: an S3 endpoint), forwards bytes both ways and can, at a chosen
moment or after a chosen number of bytes sent to clients, drop every open connection and refuse new ones,
for a while or for good. The server behind it keeps its state, as when a network path or a load balancer
fails rather than the storage service itself.
"""

from __future__ import annotations

import socket
import threading
from contextlib import suppress


class FlakyProxy:
    """Forward 127.0.0.1:`port` to 127.0.0.1:`target_port`; `cut()` drops the path, `resume()` restores it."""

    def __init__(self, port: int, target_port: int) -> None:
        self.port = port
        self.target_port = target_port
        self.connections = 0  # accepted client connections
        self.bytes_to_clients = 0
        self.cuts = 0
        self.cut_after_bytes: int | None = None  # one-shot trigger: cut once this many bytes reached clients
        self.outage_s: float | None = None  # how long a triggered cut lasts (None: for good)
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def resume(self) -> None:
        """Listen again on the same port."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        with self._lock:
            self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True, name="proxy-accept").start()

    start = resume

    def cut(self, outage_s: float | None = None) -> None:
        """Close the listener and every open connection; listen again after `outage_s` (never when None)."""
        with self._lock:
            listener, self._listener = self._listener, None
            sockets, self._sockets = self._sockets, set()
            self.cuts += 1
        for sock in ([listener] if listener else []) + list(sockets):
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with suppress(OSError):
                sock.close()
        if outage_s is not None:
            timer = threading.Timer(outage_s, self.resume)
            timer.daemon = True
            timer.start()

    def stop(self) -> None:
        self.cut(None)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # the listener was closed by cut()
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:  # cut while connecting
                    client.close()
                    upstream.close()
                    return
                self.connections += 1
                self._sockets.update((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, to_client: bool) -> None:
        try:
            while data := source.recv(65536):
                if to_client:
                    with self._lock:
                        self.bytes_to_clients += len(data)
                        trigger = self.cut_after_bytes is not None and self.bytes_to_clients >= self.cut_after_bytes
                        if trigger:
                            self.cut_after_bytes = None
                    if trigger:
                        sink.sendall(data[: len(data) // 2])  # half a chunk, then the path is gone
                        self.cut(self.outage_s)
                        return
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._sockets.difference_update((source, sink))
            for sock in (source, sink):
                with suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                with suppress(OSError):
                    sock.close()
