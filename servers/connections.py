"""The HTTP server's defences of its threads: a bound on open connections and a deadline on
reading each request.

* **Bounded connections.** Each connection holds a thread. Past ``max_connections`` a new
  connection is answered ``503`` at once, from the accepting thread, and closed: it never
  waits in a queue, and the admitted connections keep being served.
* **Request deadline.** A client has ``request_timeout_s`` to send a whole request (its headers
  and its body), counted from when the server starts waiting for it; an idle keep-alive
  connection has as long to start its next one. A reaper thread shuts down the socket of any
  connection past its deadline, so a client that trickles a byte at a time (every read
  succeeds, the request never ends) is cut off too. (Each read also times out after twice as
  long, should the reaper ever fall behind.)
  Handling a request once read (a lookup, a prediction) has no deadline here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
from http.server import ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from servers.app import InferenceServer

log = logging.getLogger(__name__)


class GuardedHTTPServer(ThreadingHTTPServer):
    """``ThreadingHTTPServer`` with a connection bound and a request deadline (module docstring).

    Handlers call :meth:`begin_reading` when they start waiting for a request and
    :meth:`end_reading` once it is read.
    """

    daemon_threads = True
    request_queue_size = 128
    app: InferenceServer  # what the handlers answer for (set by the InferenceServer)

    def __init__(
        self,
        address: tuple[str, int],
        handler: Any,
        *,
        max_connections: int = 256,
        request_timeout_s: float = 30.0,
    ) -> None:
        if max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {max_connections}")
        if not request_timeout_s > 0:
            raise ValueError(f"request_timeout_s must be > 0, got {request_timeout_s}")
        super().__init__(address, handler)
        self.max_connections = max_connections
        self.request_timeout_s = request_timeout_s
        self.refused = 0  # connections answered 503 (over the bound)
        self.cut_off = 0  # connections shut down past their request deadline
        self._open = 0
        self._lock = threading.Lock()
        self._deadlines: dict[socket.socket, float] = {}
        self._stop = threading.Event()
        self._reaper = threading.Thread(
            target=self._reap, name="streamhps-http-reaper", daemon=True
        )
        self._reaper.start()

    # ------------------------------------------------------------------ the bound

    def open_connections(self) -> int:
        with self._lock:
            return self._open

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            admitted = self._open < self.max_connections
            if admitted:
                self._open += 1
            else:
                self.refused += 1
        if not admitted:
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)  # starts the connection's thread
        except BaseException:
            self._release(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release(request)

    def _release(self, request: Any) -> None:
        with self._lock:
            self._open -= 1
            self._deadlines.pop(request, None)

    def _refuse(self, request: socket.socket) -> None:
        body = json.dumps({"error": {"type": "TooManyConnections", "message": (
            f"too many connections: this server takes {self.max_connections} at once; "
            "retry later, or reuse a keep-alive connection"
        )}}).encode()  # fmt: skip
        head = (
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
        ).encode()
        try:
            request.settimeout(1.0)  # the accepting thread never waits on a slow reader
            request.sendall(head + body)
        except OSError:
            pass
        self.shutdown_request(request)

    # ------------------------------------------------------------------ the deadline

    def begin_reading(self, request: socket.socket) -> None:
        with self._lock:
            self._deadlines[request] = time.monotonic() + self.request_timeout_s

    def end_reading(self, request: socket.socket) -> None:
        with self._lock:
            self._deadlines.pop(request, None)

    def _reap(self) -> None:
        tick = min(0.25, self.request_timeout_s / 4)
        while not self._stop.wait(tick):
            now = time.monotonic()
            with self._lock:
                late = [s for s, d in self._deadlines.items() if d <= now]
                for s in late:
                    del self._deadlines[s]
            if late:
                with self._lock:
                    self.cut_off += len(late)
            for s in late:
                log.debug("request not read within %.1fs: closing %s", self.request_timeout_s, s)
                with contextlib.suppress(OSError):  # already closed by its handler
                    s.shutdown(socket.SHUT_RDWR)  # the handler's blocked read returns at once

    def server_close(self) -> None:
        self._stop.set()
        super().server_close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that vanished (or was cut off) mid-answer is not the server's error.
        import sys

        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            log.debug("connection from %s ended: %s", client_address, exc)
            return
        log.exception("error while handling a request from %s", client_address)
