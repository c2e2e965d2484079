"""The HTTP clients against a stub server (no worker, no broker)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from streamhps.client import AsyncInferenceClient, InferenceClient


class _Stub(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _StubHandler)
        self.open_connections = 0
        self.lock = threading.Lock()


class _StubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the real server
    server: _Stub

    def setup(self) -> None:
        super().setup()
        with self.server.lock:
            self.server.open_connections += 1

    def finish(self) -> None:
        super().finish()
        with self.server.lock:
            self.server.open_connections -= 1

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass

    def do_GET(self) -> None:
        time.sleep(0.05)  # concurrent calls overlap, so they need several connections
        data = json.dumps({"ready": True}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def stub() -> Iterator[_Stub]:
    srv = _Stub()
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _wait_closed(srv: _Stub, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while srv.open_connections and time.monotonic() < deadline:
        time.sleep(0.02)
    return srv.open_connections


def test_async_client_close_closes_every_connection(stub: _Stub) -> None:
    """Concurrent calls run on several to_thread workers, each with its own keep-alive
    connection; leaving ``async with`` must close all of them, not only the loop thread's."""
    url = f"http://127.0.0.1:{stub.server_address[1]}"

    async def main() -> None:
        async with AsyncInferenceClient(url) as ac:
            await asyncio.gather(*(ac.status() for _ in range(8)))
            assert stub.open_connections > 1
        # the event loop's worker threads are still alive here, holding their thread-locals
        left = await asyncio.to_thread(_wait_closed, stub)
        assert left == 0, f"{left} connection(s) left open after the async with"

    asyncio.run(main())


def test_sync_client_close_closes_connections_of_every_thread(stub: _Stub) -> None:
    client = InferenceClient(f"http://127.0.0.1:{stub.server_address[1]}")
    with ThreadPoolExecutor(4) as pool:  # threads stay alive (with their connections) meanwhile
        list(pool.map(lambda _: client.status(), range(4)))
        assert stub.open_connections > 1
        client.close()
        assert _wait_closed(stub) == 0
    assert client.status() == {"ready": True}  # usable again after close: it reconnects
    client.close()
    assert _wait_closed(stub) == 0
