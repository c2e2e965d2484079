"""The HTTP server under abuse: oversized bodies, slow and malformed clients, too many
connections, and bearer-token authentication. Healthy requests keep working meanwhile.

Functional checks only: what the server answers and whether a connection is released, never
how fast (every wait below is a generous deadline on a condition, not a latency bound)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from servers.app import InferenceServer
from streamhps.broker import free_port
from streamhps.client import InferenceClient
from streamhps.errors import ServerError

pytestmark = pytest.mark.integration
TOKEN = "t0ken-for-tests"


@pytest.fixture
def make_server(deployment) -> Iterator[Callable[..., InferenceServer]]:  # type: ignore[no-untyped-def]
    """A server of its own over the module's worker, with the given abuse settings."""
    servers: list[InferenceServer] = []

    def make(**kw: object) -> InferenceServer:
        s = InferenceServer(deployment.worker, deployment.config, port=0, **kw).start()
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.stop()


def _connect(server: InferenceServer) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    s.settimeout(30)
    return s


def _response(s: socket.socket) -> tuple[int, bytes]:
    """Status and whole answer of the server on ``s`` (read until it closes or a full body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if not head:
        return 0, b""
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            length = int(v)
    while len(body) < length:
        chunk = s.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, body


def _closed_by_server(s: socket.socket, deadline_s: float = 30.0) -> bool:
    """Whether the server closes ``s`` (EOF or reset) before the deadline; answers are read."""
    s.settimeout(deadline_s)
    try:
        while s.recv(65536):
            pass
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def _metric(client: InferenceClient, name: str) -> float:
    text = client.metrics()
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")]
    assert len(values) == 1, (name, text)
    return values[0]


def _healthy(server: InferenceServer, deployment, token: str | None = None) -> None:  # type: ignore[no-untyped-def]
    keys, vecs = deployment.rows["user"]
    with InferenceClient(server.url, timeout=30, token=token) as c:
        np.testing.assert_array_equal(c.lookup("user", keys[:50]), vecs[:50])


# ---------------------------------------------------------------- bodies


def test_a_body_over_the_limit_is_refused_with_413_before_it_is_read(
    make_server, deployment
) -> None:  # type: ignore[no-untyped-def]
    server = make_server(max_body_bytes=4096)
    s = _connect(server)
    # the headers announce 100 MB; not one byte of it is sent
    s.sendall(b"POST /v1/lookup?table=user HTTP/1.1\r\nHost: x\r\n"
              b"Content-Type: application/octet-stream\r\nContent-Length: 100000000\r\n\r\n")  # fmt: skip
    status, body = _response(s)
    assert status == 413
    assert b"over the 4096-byte limit" in body
    assert _closed_by_server(s)
    s.close()
    # at the limit is fine
    keys = np.arange(4096 // 8, dtype=np.int64) % 600 + 1000
    with InferenceClient(server.url) as c:
        assert c.lookup("user", keys).shape == (512, 8)
        with pytest.raises(ServerError, match="limit") as e:
            c.lookup("user", np.arange(513) + 1000)
    assert e.value.status == 413


def test_a_chunked_body_is_refused_with_411(make_server) -> None:  # type: ignore[no-untyped-def]
    server = make_server()
    s = _connect(server)
    s.sendall(b"POST /v1/lookup?table=user HTTP/1.1\r\nHost: x\r\n"
              b"Transfer-Encoding: chunked\r\nContent-Type: application/octet-stream\r\n\r\n"
              b"8\r\n\x00\x00\x00\x00\x00\x00\x00\x00\r\n0\r\n\r\n")  # fmt: skip
    status, body = _response(s)
    assert status == 411 and b"Content-Length" in body
    s.close()


# ---------------------------------------------------------------- slow and malformed clients


def test_slow_and_malformed_clients_are_cut_off_and_healthy_requests_continue(
    make_server, deployment
) -> None:  # type: ignore[no-untyped-def]
    server = make_server(request_timeout_s=1.0, max_connections=8)
    stop = threading.Event()

    def trickle(s: socket.socket) -> None:
        # a byte of headers at a time, forever: every recv succeeds, the request never ends
        try:
            s.sendall(b"GET /v1/status HTTP/1.1\r\n")
            while not stop.is_set():
                s.sendall(b"X")
                time.sleep(0.1)
        except OSError:
            pass

    silent = _connect(server)  # connects, says nothing
    trickler = _connect(server)
    t = threading.Thread(target=trickle, args=(trickler,), daemon=True)
    t.start()
    half_body = _connect(server)  # announces a body, sends a tenth of it
    half_body.sendall(b"POST /v1/lookup?table=user HTTP/1.1\r\nHost: x\r\n"
                      b"Content-Type: application/octet-stream\r\nContent-Length: 80\r\n\r\n"
                      + b"\x00" * 8)  # fmt: skip
    garbage = _connect(server)  # a TLS hello-ish line: answered (HTTP/0.9 style) and closed
    garbage.sendall(b"\x16\x03\x01 not http at all\r\n")
    answer = b""
    while chunk := garbage.recv(65536):
        answer += chunk
    assert b"400" in answer and b"Bad request" in answer
    huge_header = _connect(server)
    # a header line of 64 KiB + 1 (all the server reads of it, so it closes with nothing unread)
    huge_header.sendall(b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * (65537 - 7))
    status, _ = _response(huge_header)
    assert status in (400, 431)

    _healthy(server, deployment)  # while they hang on

    for s in (silent, trickler, half_body):
        assert _closed_by_server(s), "a slow client still holds its connection"
    with InferenceClient(server.url, timeout=30) as c:
        assert _metric(c, "streamhps_http_requests_cut_off_total") >= 3
    stop.set()
    t.join(10)
    for s in (silent, trickler, half_body, garbage, huge_header):
        s.close()
    # every thread they held is free again: the whole bound is available to healthy clients
    deadline = time.monotonic() + 30
    while server.open_connections() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.open_connections() == 0
    clients = [threading.Thread(target=_healthy, args=(server, deployment)) for _ in range(8)]
    for c in clients:
        c.start()
    for c in clients:
        c.join(60)


def test_connections_over_the_bound_are_refused_at_once_with_503(make_server, deployment) -> None:  # type: ignore[no-untyped-def]
    server = make_server(max_connections=4, request_timeout_s=60.0)
    keys, vecs = deployment.rows["user"]
    healthy = InferenceClient(server.url, timeout=30)
    np.testing.assert_array_equal(healthy.lookup("user", keys[:5]), vecs[:5])  # holds 1 slot
    idle = [_connect(server) for _ in range(3)]  # the other 3
    deadline = time.monotonic() + 30
    while server.open_connections() < 4 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.open_connections() == 4
    extra = _connect(server)
    status, body = _response(extra)
    assert status == 503 and b"too many connections" in body
    assert _closed_by_server(extra)
    # asked on the healthy client's own connection: every slot is taken
    assert _metric(healthy, "streamhps_http_connections_refused_total") == 1
    assert _metric(healthy, "streamhps_http_connections") == 4
    extra.close()
    # the admitted ones are unaffected
    np.testing.assert_array_equal(healthy.lookup("user", keys[5:10]), vecs[5:10])
    for s in idle:
        s.close()
    healthy.close()
    deadline = time.monotonic() + 30
    while server.open_connections() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.open_connections() == 0
    _healthy(server, deployment)


# ---------------------------------------------------------------- authentication


def _raw(url: str, method: str, path: str, headers: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    import http.client
    from urllib.parse import urlsplit

    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    body = b"\x00" * 8 if method == "POST" else None
    h = {"Content-Type": "application/octet-stream", **(headers or {})}
    conn.request(method, path, body=body, headers=h)
    r = conn.getresponse()
    out = r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    conn.close()
    return out


GUARDED = [
    ("GET", "/"), ("GET", "/readyz"), ("GET", "/metrics"), ("GET", "/v1/status"),
    ("GET", "/v1/history"), ("POST", "/v1/lookup?table=user"), ("POST", "/v1/predict"),
    ("POST", "/v1/lookup_many?tables=user"), ("PUT", "/v1/lookup"), ("GET", "/nowhere"),
]  # fmt: skip


def test_every_route_but_healthz_needs_the_bearer_token(make_server, deployment) -> None:  # type: ignore[no-untyped-def]
    server = make_server(auth_token=TOKEN)
    code, _, data = _raw(server.url, "GET", "/healthz")
    assert code == 200 and json.loads(data) == {"status": "ok"}
    for wrong in (None, "Bearer nope", f"Basic {TOKEN}", f"Bearer {TOKEN}x", "Bearer "):
        for method, path in GUARDED:
            headers = {"Authorization": wrong} if wrong else {}
            code, h, data = _raw(server.url, method, path, headers)
            assert code == 401, (wrong, method, path, code)
            assert h.get("www-authenticate", "").startswith("Bearer")
            assert b"--auth-token-file" in data
    code, _, _ = _raw(server.url, "GET", "/v1/status", {"Authorization": f"Bearer {TOKEN}"})
    assert code == 200
    _healthy(server, deployment, token=TOKEN)
    with InferenceClient(server.url) as anonymous, pytest.raises(ServerError, match="token"):
        anonymous.lookup("user", [1000])
    with InferenceClient(server.url, token=TOKEN) as c:
        c.wait_ready(30)
        assert c.status()["tables"]


def test_serve_reads_the_token_from_a_file(deployment, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    port = free_port()
    cmd = [sys.executable, "-m", "streamhps", "serve", "--config", str(deployment.config_path),
           "--store", str(deployment.store), "--port", str(port)]  # fmt: skip
    env = {**os.environ, "COLUMNS": "400"}
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([*cmd, "--auth-token-file", str(token_file)], stdout=out,
                                stderr=subprocess.STDOUT, env=env)  # fmt: skip
    try:
        with InferenceClient(f"http://127.0.0.1:{port}", timeout=30, token=TOKEN) as c:
            c.wait_ready(60)
            keys, vecs = deployment.rows["user"]
            np.testing.assert_array_equal(c.lookup("user", keys[:3]), vecs[:3])
        code, _, _ = _raw(f"http://127.0.0.1:{port}", "GET", "/v1/status")
        assert code == 401
    finally:
        proc.terminate()
        proc.wait(30)
    empty = tmp_path / "empty"
    empty.write_text("\n")
    for bad, needle in ((tmp_path / "nope", "cannot read"), (empty, "empty")):
        r = subprocess.run([*cmd, "--auth-token-file", str(bad)], capture_output=True, text=True,
                           timeout=60, env=env)  # fmt: skip
        assert r.returncode > 0 and "Traceback" not in r.stdout + r.stderr
        assert needle in r.stdout + r.stderr and str(bad) in r.stdout + r.stderr
