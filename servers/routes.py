"""Routing: the server's routes and the HTTP handler that answers them.

Every method goes through one dispatcher (unknown methods answer 405, unknown paths 404); a
refusal is an :class:`~servers.errors.HTTPError` rendered as JSON. The routes, header names and
error body are the protocol the clients share: :mod:`streamhps.http_protocol`.
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import numpy as np

from servers.errors import HTTPError
from servers.metrics import render_metrics
from servers.status_page import PAGE
from streamhps import http_protocol as proto
from streamhps.errors import StreamHPSError
from streamhps.http_protocol import ROUTES, encode_layout, error_body

if TYPE_CHECKING:
    from servers.app import InferenceServer
    from servers.connections import GuardedHTTPServer

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 << 20


def jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x


class RequestHandler(BaseHTTPRequestHandler):
    """One HTTP connection: routes each request to the :class:`~servers.app.InferenceServer`."""

    protocol_version = "HTTP/1.1"
    server_version = "streamhps"
    # Headers and body go out in separate writes; with Nagle on, the body waits for the
    # client's delayed ACK (~40 ms per keep-alive request).
    disable_nagle_algorithm = True
    server: GuardedHTTPServer

    @property
    def app(self) -> InferenceServer:
        return self.server.app

    def setup(self) -> None:
        # each read: a backstop; the request deadline (servers.connections) acts first
        self.timeout = 2 * self.server.request_timeout_s  # type: ignore[misc]
        super().setup()

    def handle_one_request(self) -> None:
        # the whole request (line, headers, body) within the deadline: servers.connections
        self.server.begin_reading(self.connection)
        try:
            super().handle_one_request()
        finally:
            self.server.end_reading(self.connection)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("%s %s", self.address_string(), format % args)

    # every method goes through one dispatcher so unknown ones answer 405, not 501
    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_OPTIONS(self) -> None:
        self._dispatch("OPTIONS")

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        path = url.path.rstrip("/") or "/"
        query = parse_qs(url.query)
        try:
            body = self._read_body()
            self.server.end_reading(self.connection)
            if path not in proto.UNAUTHENTICATED and not self.app.authorized(
                self.headers.get("Authorization")
            ):
                raise HTTPError(
                    401,
                    "this server needs 'Authorization: Bearer <token>' (it runs with "
                    "--auth-token-file); give the client the token: InferenceClient(url, token=...)",
                    "Unauthorized",
                )
            if self.app.stopping:  # a keep-alive connection outliving stop()
                self.close_connection = True
                raise HTTPError(503, "the server is stopping", "NotReady")
            allowed = ROUTES.get(path)
            if allowed is None:
                raise HTTPError(404, f"no route {path}; routes: {sorted(ROUTES)}", "NotFound")
            if method not in allowed:
                raise HTTPError(
                    405,
                    f"{method} is not allowed on {path}; use {', '.join(allowed)}",
                    "MethodNotAllowed",
                )
            self._route(path, query, body)
        except HTTPError as e:
            self.app.count(errors=1)
            extra = {"Allow": ", ".join(ROUTES[path])} if e.status == 405 else {}
            if e.status == 401:
                extra = {"WWW-Authenticate": 'Bearer realm="streamhps"'}
            self._json(e.status, error_body(e.kind, str(e)), extra)
        except StreamHPSError as e:
            self.app.count(errors=1)
            self._json(500, error_body(type(e).__name__, str(e)))
        except Exception as e:  # noqa: BLE001 - answer 500 with the reason rather than drop the connection
            log.exception("request %s %s failed", method, self.path)
            self.app.count(errors=1)
            self._json(500, error_body("ServerError", f"{type(e).__name__}: {e}"))

    def _read_body(self) -> bytes:
        """The body, refused before a byte of it is read if it is chunked or over the limit."""
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            self.close_connection = True
            raise HTTPError(
                411, "chunked bodies are not taken: send Content-Length", "LengthRequired"
            )
        n = self.headers.get("Content-Length")
        if not n:
            return b""
        try:
            size = int(n)
        except ValueError:
            raise HTTPError(400, f"Content-Length {n!r} is not a number") from None
        if size < 0:
            self.close_connection = True
            raise HTTPError(400, f"Content-Length {size} is negative")
        limit = self.app.max_body_bytes
        if size > limit:
            self.close_connection = True
            raise HTTPError(413, f"request body of {size} bytes is over the {limit}-byte limit")
        try:
            body = self.rfile.read(size)
        except OSError:  # a read timed out: the client sends too slowly
            self.close_connection = True
            timeout = self.server.request_timeout_s
            raise HTTPError(
                408, f"the body was not sent within {timeout}s", "RequestTimeout"
            ) from None
        if len(body) < size:  # the client stopped sending, or was cut off at its deadline
            self.close_connection = True
            raise HTTPError(400, f"the body ended after {len(body)} of {size} bytes")
        return body

    def _json_body(self, body: bytes) -> Any:
        ctype = (self.headers.get("Content-Type") or proto.JSON).split(";")[0].strip()
        if ctype != proto.JSON:
            raise HTTPError(
                415,
                f"Content-Type {ctype!r}: send application/json (or application/octet-stream to /v1/lookup)",
            )
        if not body:
            raise HTTPError(400, "empty body: send a JSON object")
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise HTTPError(400, f"malformed JSON: {e}") from None

    def _route(self, path: str, query: dict[str, list[str]], body: bytes) -> None:
        app = self.app
        if path == proto.PAGE:
            self._send(200, PAGE.encode(), "text/html; charset=utf-8")
        elif path == proto.FAVICON:
            self._send(204, b"", "image/x-icon")  # browsers ask; not an error
        elif path == proto.HEALTHZ:
            self._json(200, {"status": "ok"})
        elif path == proto.READYZ:
            ready = bool(app.worker.ready())
            if ready:
                self._json(200, {"ready": True})
            else:
                self._json(503, {"ready": False, "reason": app.worker.not_ready_reason()})
        elif path == proto.METRICS:
            self._send(
                200, render_metrics(app).encode(), "text/plain; version=0.0.4; charset=utf-8"
            )
        elif path == proto.STATUS:
            self._json(200, app.status())
        elif path == proto.HISTORY:
            try:
                seconds = float((query.get("seconds") or ["300"])[0])
            except ValueError:
                raise HTTPError(400, "'seconds' must be a number") from None
            self._json(200, app.history.view(seconds))
        elif path == proto.LOOKUP:
            ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip()
            if ctype == proto.BINARY:
                vecs = app.handle_lookup_binary(query, body)
                self._send(
                    200, vecs.astype(vecs.dtype.newbyteorder("<"), copy=False).tobytes(), proto.BINARY,
                    {proto.DTYPE_HEADER: vecs.dtype.newbyteorder("<").str,
                     proto.SHAPE_HEADER: f"{vecs.shape[0]},{vecs.shape[1] if vecs.ndim == 2 else 0}"},
                )  # fmt: skip
            else:
                self._json(200, app.handle_lookup_json(self._json_body(body)), clean=True)
        elif path == proto.LOOKUP_MANY:
            ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip()
            if ctype != proto.BINARY:
                raise HTTPError(415, "/v1/lookup_many takes application/octet-stream int64 keys")
            rows = app.handle_lookup_many_binary(query, body)
            # each table's rows straight from its array to the socket: no tobytes, no join (two
            # fresh copies of the whole answer, ~9 ms per 16 MB on the 2-core machine)
            parts = [_wire_bytes(a) for a in rows.values()]
            self._send(200, parts, proto.BINARY,
                       {proto.LAYOUT_HEADER: encode_layout(rows)})  # fmt: skip
        elif path == proto.PREDICT:
            ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip()
            if ctype == proto.BINARY:
                scores, version = app.handle_predict_binary(query, body)
                self._send(200, scores.astype("<f4").tobytes(), proto.BINARY,
                           {proto.DENSE_VERSION_HEADER: str(version),
                            proto.SHAPE_HEADER: str(scores.shape[0])})  # fmt: skip
            else:
                self._json(200, app.handle_predict(self._json_body(body)), clean=True)

    def _json(
        self, status: int, obj: Any, headers: dict[str, str] | None = None, *, clean: bool = False
    ) -> None:
        """``clean=True``: ``obj`` holds only JSON types already (rows via ``tolist()``): skip the
        per-element walk, which costs more than the encoding on large answers."""
        data = json.dumps(
            obj if clean else jsonable(obj), separators=(",", ":"), allow_nan=False
        ).encode()
        self._send(status, data, proto.JSON, headers)

    def _send(
        self,
        status: int,
        data: bytes | memoryview | list[memoryview],
        ctype: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        """One answer; ``data`` may be a list of byte views sent one after the other."""
        parts = data if isinstance(data, list) else [memoryview(data)]
        self.send_response(status, HTTPStatus(status).phrase)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(sum(p.nbytes for p in parts)))
        self.send_header("Cache-Control", "no-store")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            for part in parts:
                self.wfile.write(part)


def _wire_bytes(a: np.ndarray) -> memoryview:
    """A little-endian, C-contiguous array's bytes as a flat view (copies only when it must)."""
    a = np.ascontiguousarray(a.astype(a.dtype.newbyteorder("<"), copy=False))
    return a.reshape(-1).view(np.uint8).data
