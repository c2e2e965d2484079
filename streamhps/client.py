"""Clients of the inference server (``streamhps serve``).

::

    from streamhps.client import InferenceClient

    client = InferenceClient("http://127.0.0.1:8000")
    client.wait_ready(timeout=30)
    vecs = client.lookup("user", [1, 2, 3])            # numpy [3, dim]
    scores = client.predict({"user": [1], "item": [7]}, dense=[[0.1, 0.2]])
    rows = client.lookup_many({"user": [1, 2], "item": [7]})   # every table in one request

    # sparse shards (``serve --role sparse``): route each key to the shard that serves it
    sharded = ShardedClient("placement.json", ["http://10.0.0.1:8001", "http://10.0.0.2:8001"])
    rows = sharded.lookup_many({"user": users, "item": items})  # fan-out in parallel, merged in order

Lookups travel in the binary form (int64 keys in, raw ``[n, dim]`` out; ``binary=False``
for the JSON form). Errors the
server reports are raised as streamhps exceptions carrying the server's message:
:class:`~streamhps.errors.UnknownTableError`, :class:`~streamhps.errors.MissingKeyError`,
:class:`~streamhps.errors.StaleReadError`, else :class:`~streamhps.errors.ServerError`
(``.status`` holds the HTTP status on each). :class:`AsyncInferenceClient` is the asyncio
twin with the same methods. :class:`ShardedClient` routes lookups over sparse shards by a
placement (``streamhps plan``) for users who run their own model step.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

import numpy as np

from streamhps.errors import (
    MissingKeyError,
    NotOwnedError,
    ServerError,
    ShardUnavailableError,
    StaleReadError,
    UnknownTableError,
)
from streamhps.http_protocol import (
    BINARY,
    DENSE_VERSION_HEADER,
    DTYPE_HEADER,
    HEALTHZ,
    HISTORY,
    JSON,
    LAYOUT_HEADER,
    LOOKUP,
    LOOKUP_MANY,
    METRICS,
    PREDICT,
    READYZ,
    SHAPE_HEADER,
    STATUS,
    decode_rows,
    error_from_answer,
)
from streamhps.http_protocol import encode_layout as encode_layout  # the old import path
from streamhps.keys import as_int64_keys

if TYPE_CHECKING:
    from streamhps.placement import Placement

log = logging.getLogger(__name__)


class InferenceClient:
    """A thread-safe client (one keep-alive connection per thread).

    ``token``: the bearer token of a server run with ``--auth-token-file`` (sent as
    ``Authorization: Bearer <token>`` on every request)."""

    def __init__(self, url: str, *, timeout: float = 30.0, token: str | None = None) -> None:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"server url must look like http://host:port, got {url!r}")
        self.url = f"{parts.scheme}://{parts.netloc}"
        self._scheme = parts.scheme
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self.timeout = timeout
        if token is not None and (not token or any(c in token for c in "\r\n")):
            raise ValueError("token must be a non-empty string on one line")
        self._auth = {"Authorization": f"Bearer {token}"} if token else {}
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
        k = _int64_keys(keys)
        if binary:
            path = f"{LOOKUP}?table={quote(table)}&consistency={quote(consistency)}"
            body = np.ascontiguousarray(k, dtype="<i8").tobytes()
            status, headers, data = self._request("POST", path, body, BINARY)
            self._raise_for(status, data)
            dtype = np.dtype(headers.get(DTYPE_HEADER.lower(), "<f4"))
            n, dim = (int(x) for x in headers.get(SHAPE_HEADER.lower(), "0,0").split(","))
            return (
                np.frombuffer(data, dtype=dtype)
                .reshape(n, dim)
                .astype(dtype.newbyteorder("="), copy=False)
            )
        out = self._call(
            "POST", LOOKUP, {"table": table, "keys": k.tolist(), "consistency": consistency}
        )
        dim = int(out["dim"])
        return np.asarray(out["vectors"], dtype=out["dtype"]).reshape(-1, dim)

    def lookup_many(
        self, keys: Mapping[str, Sequence[int] | np.ndarray], *, consistency: str = "eventual"
    ) -> dict[str, np.ndarray]:
        """Rows of several tables in one request (binary): ``{table: keys}`` -> ``{table: [n, dim]}``."""
        tables = list(keys)
        ks = [_int64_keys(keys[t]) for t in tables]
        if not tables:
            return {}
        path = (
            f"{LOOKUP_MANY}?tables={quote(','.join(tables))}"
            f"&counts={','.join(str(k.shape[0]) for k in ks)}&consistency={quote(consistency)}"
        )
        body = b"".join(np.ascontiguousarray(k, dtype="<i8").tobytes() for k in ks)
        status, headers, data = self._request("POST", path, body, BINARY)
        self._raise_for(status, data)
        return decode_rows(headers.get(LAYOUT_HEADER.lower(), ""), data)

    def predict(
        self,
        features: Mapping[str, Sequence[int] | np.ndarray],
        dense: Sequence[Sequence[float]] | np.ndarray | None = None,
        *,
        consistency: str = "eventual",
        binary: bool = True,
    ) -> np.ndarray:
        """Click probabilities ``[n]`` (numpy float32) for ``n`` examples: ``features`` maps each
        table to ``n`` ids, ``dense`` is ``[n, num_dense]``. ``binary=True`` (default) sends
        int64 ids and float32 features and gets float32 scores back; ``False`` uses JSON."""
        return np.asarray(
            self.predict_raw(features, dense, consistency=consistency, binary=binary)["scores"],
            dtype=np.float32,
        )

    def predict_raw(
        self,
        features: Mapping[str, Sequence[int] | np.ndarray],
        dense: Sequence[Sequence[float]] | np.ndarray | None = None,
        *,
        consistency: str = "eventual",
        binary: bool = True,
    ) -> dict[str, Any]:
        """The server's whole predict answer: ``scores`` and ``dense_version``."""
        if binary:
            ids = []
            for t, v in features.items():
                k = _int64_keys(v, f"features[{t!r}]")
                ids.append(np.ascontiguousarray(k, dtype="<i8"))
            n = ids[0].size if ids else 0
            x = np.zeros((n, 0), "<f4") if dense is None else np.asarray(dense, dtype="<f4")
            path = (
                f"{PREDICT}?tables={quote(','.join(features))}"
                f"&counts={','.join(str(k.size) for k in ids)}&consistency={quote(consistency)}"
            )
            payload = b"".join([*(k.tobytes() for k in ids), np.ascontiguousarray(x).tobytes()])
            status, headers, data = self._request("POST", path, payload, BINARY)
            self._raise_for(status, data)
            return {
                "scores": np.frombuffer(data, dtype="<f4").astype(np.float32),
                "dense_version": int(headers.get(DENSE_VERSION_HEADER.lower(), 0)),
            }
        body: dict[str, Any] = {
            "features": {t: np.asarray(v).tolist() for t, v in features.items()},
            "consistency": consistency,
        }
        if dense is not None:
            body["dense"] = np.asarray(dense, dtype=np.float64).tolist()
        return dict(self._call("POST", PREDICT, body))

    def status(self) -> dict[str, Any]:
        return dict(self._call("GET", STATUS))

    def history(self, seconds: float = 300) -> dict[str, Any]:
        return dict(self._call("GET", f"{HISTORY}?seconds={seconds}"))

    def metrics(self) -> str:
        status, _, data = self._request("GET", METRICS)
        self._raise_for(status, data)
        return data.decode()

    def healthy(self) -> bool:
        try:
            status, _, _ = self._request("GET", HEALTHZ)
        except ServerError:
            return False
        return status == 200

    def ready(self) -> tuple[bool, str | None]:
        """(ready, reason): the server's /readyz answer."""
        status, _, data = self._request("GET", READYZ)
        if status not in (200, 503):  # not an answer about readiness (e.g. 401: no token)
            self._raise_for(status, data)
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
        headers = {"Content-Type": ctype, **self._auth} if ctype else dict(self._auth)
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
        status, _, data = self._request(method, path, body, JSON if body is not None else None)
        self._raise_for(status, data)
        return json.loads(data)

    @staticmethod
    def _raise_for(status: int, data: bytes) -> None:
        if status < 400:
            return
        raise error_from_answer(status, data)


class AsyncInferenceClient:
    """The asyncio twin of :class:`InferenceClient`: the same methods, awaitable.

    Each call runs the blocking client on a worker thread (``asyncio.to_thread``), so many
    concurrent calls use many keep-alive connections.
    """

    def __init__(self, url: str, *, timeout: float = 30.0, token: str | None = None) -> None:
        self._sync = InferenceClient(url, timeout=timeout, token=token)
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


def _int64_keys(keys: Sequence[int] | np.ndarray, what: str = "keys") -> np.ndarray:
    return as_int64_keys(keys, what, ValueError)


class ShardedClient:
    """Lookups over sparse shards (``streamhps serve --role sparse``), routed by a placement.

    ``placement``: a :class:`~streamhps.placement.Placement` or its file; ``urls``: the shards'
    addresses in shard order (``urls[i]`` serves shard ``i``). Each key goes to the shard that
    serves its partition (``placement.owner``); the shards are asked in parallel (one
    multi-table request per shard) and the rows merged back in request order.

    A shard that cannot be reached raises :class:`ShardUnavailableError` naming it (a
    :class:`StaleReadError`); a shard past its staleness bound refuses bounded reads with
    :class:`StaleReadError` (retried until ``timeout`` when one is given). Thread-safe.
    """

    def __init__(
        self,
        placement: Placement | str | os.PathLike[str],
        urls: Sequence[str],
        *,
        timeout: float = 10.0,
        max_workers: int | None = None,
        token: str | None = None,
    ) -> None:
        from streamhps.placement import Placement

        self.placement = (
            placement if isinstance(placement, Placement) else Placement.load(placement)
        )
        urls = list(urls)
        if len(urls) != self.placement.n_shards:
            raise ValueError(
                f"the placement has {self.placement.n_shards} shards but {len(urls)} url(s) were "
                "given; give one url per shard, in shard order"
            )
        self.token = token
        self.clients = [InferenceClient(u, timeout=timeout, token=token) for u in urls]
        self.urls = [c.url for c in self.clients]
        self._pool = ThreadPoolExecutor(
            max_workers=max_workers or max(4, 2 * len(urls)), thread_name_prefix="streamhps-fanout"
        )
        self._stats_lock = threading.Lock()
        self.counters = {"requests": 0, "keys": 0, "shard_requests": 0, "errors": 0}

    # ------------------------------------------------------------------ routing

    def split(self, table: str, keys: Sequence[int] | np.ndarray) -> dict[int, np.ndarray]:
        """Shard -> positions in ``keys`` of the keys it serves (each position in exactly one)."""
        k = _int64_keys(keys)
        owner = self.placement.owner(table, k)
        shards = np.unique(self.placement.owner_of_partitions(table)).tolist()
        if len(shards) == 1:  # a table on one shard (table-wise placement)
            return {shards[0]: np.arange(k.shape[0])} if k.size else {}
        out = {}
        for s in shards:  # one pass per shard beats a sort for the few shards a table is on
            idx = np.flatnonzero(owner == s)
            if idx.size:
                out[s] = idx
        return out

    def lookup(
        self,
        table: str,
        keys: Sequence[int] | np.ndarray,
        consistency: str = "eventual",
        timeout: float | None = None,
    ) -> np.ndarray:
        """Rows of ``keys`` of ``table`` (numpy ``[n, dim]``), from the shards that serve them."""
        return self.lookup_many({table: keys}, consistency, timeout)[table]

    def lookup_many(
        self,
        keys: Mapping[str, Sequence[int] | np.ndarray],
        consistency: str = "eventual",
        timeout: float | None = None,
    ) -> dict[str, np.ndarray]:
        """``{table: keys}`` -> ``{table: rows}``: one request per shard involved, in parallel."""
        deadline = time.monotonic() + (timeout or 0.0)
        while True:
            try:
                return self._lookup_many(keys, consistency)
            except ShardUnavailableError:
                raise
            except StaleReadError:
                if consistency != "bounded" or time.monotonic() >= deadline:
                    raise
                time.sleep(0.01)

    def _lookup_many(
        self, keys: Mapping[str, Sequence[int] | np.ndarray], consistency: str
    ) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        per_shard: dict[int, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
        n_keys = 0
        for table, raw in keys.items():
            k = _int64_keys(raw)
            info = self.placement.tables.get(table)
            if info is None:
                raise UnknownTableError(
                    f"unknown table {table!r}; the placement has {sorted(self.placement.tables)}"
                )
            out[table] = np.empty((k.shape[0], info.dim), dtype=info.dtype)
            n_keys += int(k.shape[0])
            for s, idx in self.split(table, k).items():
                per_shard.setdefault(s, {})[table] = (idx, k[idx])
        with self._stats_lock:
            self.counters["requests"] += 1
            self.counters["keys"] += n_keys
            self.counters["shard_requests"] += len(per_shard)
        if not per_shard:  # no keys at all
            return out
        # every shard but the first on the pool, the first on this thread, then wait for all
        (s0, req0), *rest = per_shard.items()
        futs = [(s, req, self._pool.submit(self._ask, s, req, consistency)) for s, req in rest]
        results = []
        error: BaseException | None = None
        try:
            results.append((s0, req0, self._ask(s0, req0, consistency)))
        except BaseException as e:  # noqa: BLE001 - re-raised below, after the others finished
            error = e
        for s, req, f in futs:  # no request left running on a connection when this returns
            try:
                results.append((s, req, f.result()))
            except BaseException as e:  # noqa: BLE001 - re-raised below, first one wins
                error = error or e
        if error is not None:
            raise error
        for _s, req, rows in results:
            for table, (idx, _k) in req.items():
                out[table][idx] = rows[table]
        return out

    def _ask(
        self, shard: int, req: Mapping[str, tuple[np.ndarray, np.ndarray]], consistency: str
    ) -> dict[str, np.ndarray]:
        client = self.clients[shard]
        try:
            return client.lookup_many({t: k for t, (_i, k) in req.items()}, consistency=consistency)
        except StaleReadError as e:
            self._count_error()
            raise type(e)(f"shard {shard} ({client.url}): {self._said(e)}") from e
        except ServerError as e:
            self._count_error()
            status = e.status
            if status is None or status >= 500:  # down, stopping, or failing: not answering
                raise ShardUnavailableError(
                    f"shard {shard} ({client.url}) is unavailable: {e}"
                ) from e
            raise
        except (MissingKeyError, NotOwnedError, UnknownTableError) as e:
            self._count_error()
            raise type(e)(f"shard {shard} ({client.url}): {self._said(e)}") from e

    @staticmethod
    def _said(e: BaseException) -> str:
        """A shard's message without the HTTP status the client appended (it is re-answered)."""
        return re.sub(r" \(HTTP \d{3}\)$", "", str(e))

    def _count_error(self) -> None:
        with self._stats_lock:
            self.counters["errors"] += 1

    # ------------------------------------------------------------------ health

    def shard_states(self) -> list[tuple[bool, str | None]]:
        """(ready, reason) of every shard, asked now (in parallel)."""

        def ask(c: InferenceClient) -> tuple[bool, str | None]:
            try:
                return c.ready()
            except ServerError as e:
                return False, f"unreachable: {e}"

        return list(self._pool.map(ask, self.clients))

    def not_ready_reason(self) -> str | None:
        """None when every shard is ready, else the first one that is not, named."""
        for s, (ok, reason) in enumerate(self.shard_states()):
            if not ok:
                return f"shard {s} ({self.urls[s]}) is not ready: {reason}"
        return None

    def ready(self) -> bool:
        return self.not_ready_reason() is None

    def wait_ready(self, timeout: float = 30.0, *, interval: float = 0.1) -> None:
        """Block until every shard is ready; raise :class:`ServerError` naming one that is not."""
        deadline = time.monotonic() + timeout
        while True:
            reason = self.not_ready_reason()
            if reason is None:
                return
            if time.monotonic() >= deadline:
                raise ServerError(f"not ready after {timeout:.1f}s: {reason}")
            time.sleep(interval)

    def staleness(self) -> dict[str, dict[int, dict[str, Any]]]:
        """Per table, per partition, from the shard that serves it (each shard's ``/v1/status``)."""
        merged: dict[str, dict[int, dict[str, Any]]] = {}
        for status in self._pool.map(lambda c: c.status(), self.clients):
            for table, parts in (status.get("staleness") or {}).items():
                for p, row in parts.items():
                    merged.setdefault(table, {})[int(p)] = row
        return {t: dict(sorted(ps.items())) for t, ps in merged.items()}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        for c in self.clients:
            c.close()

    def __enter__(self) -> ShardedClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
