"""Clients of the inference server (``streamhps serve``).

::

    from streamhps.client import InferenceClient

    client = InferenceClient("http://127.0.0.1:8000")
    client.wait_ready(timeout=30)
    vecs = client.lookup("user", [1, 2, 3])            # numpy [3, dim]
    scores = client.predict({"user": [1], "item": [7]}, dense=[[0.1, 0.2]])

Lookups travel in the binary form (int64 keys in, raw ``[n, dim]`` out; ``binary=False``
for the JSON form). Errors the
server reports are raised as streamhps exceptions carrying the server's message:
:class:`~streamhps.errors.UnknownTableError`, :class:`~streamhps.errors.MissingKeyError`,
:class:`~streamhps.errors.StaleReadError`, else :class:`~streamhps.errors.ServerError`
(``.status`` holds the HTTP status on each). :class:`AsyncInferenceClient` is the asyncio
twin with the same methods.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote, urlsplit

import numpy as np

from streamhps.errors import (
    MissingKeyError,
    ServerError,
    StaleReadError,
    StreamHPSError,
    UnknownTableError,
)

log = logging.getLogger(__name__)

_ERRORS: dict[str, type[StreamHPSError]] = {
    "UnknownTableError": UnknownTableError,
    "MissingKeyError": MissingKeyError,
    "StaleReadError": StaleReadError,
}


class InferenceClient:
    """A thread-safe client (one keep-alive connection per thread)."""

    def __init__(self, url: str, *, timeout: float = 30.0) -> None:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"server url must look like http://host:port, got {url!r}")
        self.url = f"{parts.scheme}://{parts.netloc}"
        self._scheme = parts.scheme
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self.timeout = timeout
        self._local = threading.local()
        # every thread's connection, so that close() reaches those of other threads too
        self._conns: set[http.client.HTTPConnection] = set()
        self._conns_lock = threading.Lock()

    # ------------------------------------------------------------------ API

    def lookup(
        self,
        table: str,
        keys: Sequence[int] | np.ndarray,
        *,
        consistency: str = "eventual",
        binary: bool = True,
    ) -> np.ndarray:
        """Vectors of ``keys`` in ``table`` as numpy ``[n, dim]`` (the table's dtype).

        ``binary=True`` (default) sends int64 keys and gets raw rows back; ``False`` uses the
        JSON form (the same rows, ~100x slower for large batches: every float is printed)."""
        k = np.asarray(keys)
        if k.ndim != 1 or (k.size and k.dtype.kind not in "iu"):
            raise ValueError(
                f"keys must be a flat sequence of integer ids, got dtype {k.dtype} shape {k.shape}"
            )
        k = k.view(np.int64) if k.dtype == np.uint64 else k.astype(np.int64, copy=False)
        if binary:
            path = f"/v1/lookup?table={quote(table)}&consistency={quote(consistency)}"
            body = np.ascontiguousarray(k, dtype="<i8").tobytes()
            status, headers, data = self._request("POST", path, body, "application/octet-stream")
            self._raise_for(status, data)
            dtype = np.dtype(headers.get("x-streamhps-dtype", "<f4"))
            n, dim = (int(x) for x in headers.get("x-streamhps-shape", "0,0").split(","))
            return (
                np.frombuffer(data, dtype=dtype)
                .reshape(n, dim)
                .astype(dtype.newbyteorder("="), copy=False)
            )
        out = self._call(
            "POST", "/v1/lookup", {"table": table, "keys": k.tolist(), "consistency": consistency}
        )
        dim = int(out["dim"])
        return np.asarray(out["vectors"], dtype=out["dtype"]).reshape(-1, dim)

    def predict(
        self,
        features: Mapping[str, Sequence[int] | np.ndarray],
        dense: Sequence[Sequence[float]] | np.ndarray | None = None,
        *,
        consistency: str = "eventual",
    ) -> np.ndarray:
        """Click probabilities ``[n]`` for ``n`` examples: ``features`` maps each table to ``n``
        ids, ``dense`` is ``[n, num_dense]``."""
        return np.asarray(
            self.predict_raw(features, dense, consistency=consistency)["scores"], dtype=np.float64
        )

    def predict_raw(
        self,
        features: Mapping[str, Sequence[int] | np.ndarray],
        dense: Sequence[Sequence[float]] | np.ndarray | None = None,
        *,
        consistency: str = "eventual",
    ) -> dict[str, Any]:
        """The server's whole predict answer: ``scores`` and ``dense_version``."""
        body: dict[str, Any] = {
            "features": {t: np.asarray(v).tolist() for t, v in features.items()},
            "consistency": consistency,
        }
        if dense is not None:
            body["dense"] = np.asarray(dense, dtype=np.float64).tolist()
        return dict(self._call("POST", "/v1/predict", body))

    def status(self) -> dict[str, Any]:
        return dict(self._call("GET", "/v1/status"))

    def history(self, seconds: float = 300) -> dict[str, Any]:
        return dict(self._call("GET", f"/v1/history?seconds={seconds}"))

    def metrics(self) -> str:
        status, _, data = self._request("GET", "/metrics")
        self._raise_for(status, data)
        return data.decode()

    def healthy(self) -> bool:
        try:
            status, _, _ = self._request("GET", "/healthz")
        except ServerError:
            return False
        return status == 200

    def ready(self) -> tuple[bool, str | None]:
        """(ready, reason): the server's /readyz answer."""
        status, _, data = self._request("GET", "/readyz")
        body = json.loads(data) if data else {}
        return status == 200, body.get("reason")

    def wait_ready(self, timeout: float = 30.0, *, interval: float = 0.1) -> None:
        """Block until /readyz answers 200; raise :class:`ServerError` with the last reason."""
        deadline = time.monotonic() + timeout
        reason: str | None = "server not reachable"
        while True:
            try:
                ok, reason = self.ready()
                if ok:
                    return
            except ServerError as e:
                reason = str(e)
            if time.monotonic() >= deadline:
                raise ServerError(f"{self.url} not ready after {timeout:.1f}s: {reason}")
            time.sleep(interval)

    def close(self) -> None:
        """Close the connections of every thread (a later call reconnects)."""
        with self._conns_lock:
            conns, self._conns = self._conns, set()
        for conn in conns:
            conn.close()

    def _drop_conn(self) -> None:
        """Close this thread's connection only (after an error on it)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
            with self._conns_lock:
                self._conns.discard(conn)

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ transport

    def _conn(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            klass = (
                http.client.HTTPSConnection
                if self._scheme == "https"
                else http.client.HTTPConnection
            )
            conn = klass(self._host, self._port, timeout=self.timeout)
            self._local.conn = conn
        with self._conns_lock:
            self._conns.add(conn)  # again after close(): the thread keeps its (closed) object
        return conn

    def _request(
        self, method: str, path: str, body: bytes | None = None, ctype: str | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        headers = {"Content-Type": ctype} if ctype else {}
        for attempt in (0, 1):  # one retry: a keep-alive connection the server closed meanwhile
            conn = self._conn()
            try:
                if conn.sock is None:
                    conn.connect()
                    # small requests must not wait for a delayed ACK (Nagle)
                    sock: socket.socket = getattr(conn, "sock")  # noqa: B009 - set by connect()
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn.request(method, path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
            except (ConnectionError, http.client.HTTPException, OSError) as e:
                self._drop_conn()
                if attempt:
                    raise ServerError(
                        f"{method} {self.url}{path} failed: {type(e).__name__}: {e}"
                    ) from e
        raise AssertionError("unreachable")

    def _call(self, method: str, path: str, payload: Any = None) -> Any:
        body = None if payload is None else json.dumps(payload).encode()
        status, _, data = self._request(
            method, path, body, "application/json" if body is not None else None
        )
        self._raise_for(status, data)
        return json.loads(data)

    @staticmethod
    def _raise_for(status: int, data: bytes) -> None:
        if status < 400:
            return
        kind, message = "ServerError", data[:500].decode(errors="replace")
        try:
            err = json.loads(data)["error"]
            kind, message = str(err["type"]), str(err["message"])
        except (ValueError, KeyError, TypeError):
            pass
        exc = _ERRORS.get(kind, ServerError)(f"{message} (HTTP {status})")
        exc.status = status  # type: ignore[attr-defined]
        exc.kind = kind  # type: ignore[attr-defined]
        raise exc


class AsyncInferenceClient:
    """The asyncio twin of :class:`InferenceClient`: the same methods, awaitable.

    Each call runs the blocking client on a worker thread (``asyncio.to_thread``), so many
    concurrent calls use many keep-alive connections.
    """

    def __init__(self, url: str, *, timeout: float = 30.0) -> None:
        self._sync = InferenceClient(url, timeout=timeout)
        self.url = self._sync.url

    async def lookup(self, table: str, keys: Sequence[int] | np.ndarray, **kw: Any) -> np.ndarray:
        return await asyncio.to_thread(self._sync.lookup, table, keys, **kw)

    async def predict(
        self, features: Mapping[str, Any], dense: Any = None, **kw: Any
    ) -> np.ndarray:
        return await asyncio.to_thread(self._sync.predict, features, dense, **kw)

    async def status(self) -> dict[str, Any]:
        return await asyncio.to_thread(self._sync.status)

    async def metrics(self) -> str:
        return await asyncio.to_thread(self._sync.metrics)

    async def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        reason: str | None = "server not reachable"
        while True:
            try:
                ok, reason = await asyncio.to_thread(self._sync.ready)
                if ok:
                    return
            except ServerError as e:
                reason = str(e)
            if time.monotonic() >= deadline:
                raise ServerError(f"{self.url} not ready after {timeout:.1f}s: {reason}")
            await asyncio.sleep(0.1)

    async def close(self) -> None:
        self._sync.close()

    async def __aenter__(self) -> AsyncInferenceClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()
