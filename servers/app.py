"""HTTP front end over one :class:`~streamhps.worker.InferenceWorker` plus the dense model.

Read-only by construction: no route writes a row (invariant 8, docs/INVARIANTS.md). Routes::

    GET  /             status page (live charts, polls /v1/history)
    GET  /healthz      200 while the process serves HTTP
    GET  /readyz       200 when the worker is within its staleness bound, else 503 + reason
    GET  /metrics      Prometheus text format
    GET  /v1/status    worker state: readiness, staleness per partition, stats, dense version
    GET  /v1/history   one sample per second for the status page (?seconds=N)
    POST /v1/lookup    JSON {"table", "keys", "consistency"?} -> {"vectors": [[...]], ...}
                       or binary: body = little-endian int64 keys, ?table=NAME[&consistency=]
                       -> raw [n, dim] bytes, headers X-Streamhps-Dtype / X-Streamhps-Shape
    POST /v1/lookup_many  binary: body = every table's int64 keys, one after the other,
                       ?tables=A,B&counts=nA,nB[&consistency=] -> the rows of each table, one
                       after the other, header X-Streamhps-Layout: A:<f4:nA:dim,B:...
    POST /v1/predict   JSON {"features": {table: [ids]}, "dense": [[...]]?} -> {"scores": [...]}
                       or binary: ?tables=A,B&rows=N[&consistency=], body = each table's N
                       little-endian int64 ids in that order, then [N, num_dense] little-endian
                       float32 -> N float32 scores, header X-Streamhps-Dense-Version

Predict runs on the worker's device: every table's rows in one ``lookup_many`` (torch tensors
on a cuda worker), then the trainer's own torch module (:class:`servers.model.ServedModel`);
concurrent predicts are merged into one device batch (:mod:`servers.batching`;
``max_batch_rows=0`` turns that off).

Errors are JSON ``{"error": {"type": <streamhps exception name>, "message": ...}}`` with a 4xx
status for a bad request (400 malformed, 404 unknown table or key, 413 too many keys,
415 wrong content type, 421 a key another sparse shard serves) and 503 for a stale worker, an
unreachable sparse shard or a missing dense model.

The server's parts, one module each: :mod:`servers.routes` (routes and the HTTP handler),
:mod:`servers.payloads` (request decoding and checks), :mod:`servers.errors` (refusals),
:mod:`servers.metrics` (Prometheus), :mod:`servers.history` (the status page's samples).

Roles (``role=``): ``single`` (default) serves one worker that holds every table; ``sparse``
serves a sharded worker's lookups only (no dense model, predict answers 404); ``main`` serves a
:class:`~streamhps.routing.ShardRouter` in place of the worker: its lookups fan out to the sparse
shards and it predicts with the dense model it follows itself.
"""

from __future__ import annotations

import contextlib
import functools
import hmac
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np

from servers.batching import DynamicBatcher
from servers.connections import GuardedHTTPServer
from servers.errors import HTTPError, lookup_errors
from servers.history import StatusHistory
from servers.metrics import LATENCY_BUCKETS, Histogram, render_metrics
from servers.model import ServedModel
from servers.payloads import CONSISTENCY, Query, RequestPayloads
from servers.routes import MAX_BODY_BYTES, RequestHandler, jsonable
from streamhps.config import Config
from streamhps.errors import ValidationError
from streamhps.http_protocol import ROUTES

__all__ = [
    "CONSISTENCY",
    "LATENCY_BUCKETS",
    "MAX_BODY_BYTES",
    "ROLES",
    "ROUTES",
    "HTTPError",
    "Histogram",
    "InferenceServer",
]

log = logging.getLogger(__name__)

ROLES = ("single", "sparse", "main")


class ServedWorker(Protocol):
    """What the server serves from: an :class:`~streamhps.worker.InferenceWorker`, or on a main
    shard a :class:`~streamhps.routing.ShardRouter` (its lookups fan out to the sparse shards).
    A ``torch_device`` attribute, where there is one, places the dense model beside the rows."""

    def lookup(self, table: str, keys: Any, *, consistency: str = ...) -> Any: ...

    def lookup_many(
        self, keys: Mapping[str, Any], *, consistency: str = ...
    ) -> Mapping[str, Any]: ...

    def ready(self) -> bool: ...

    def not_ready_reason(self) -> str | None: ...

    def staleness(self) -> Mapping[str, Mapping[int, Mapping[str, Any]]]: ...

    def stats(self) -> dict[str, Any]: ...

    def dense_model(self) -> tuple[int, dict[str, np.ndarray]] | None: ...

    def on_dense(self, callback: Callable[[int, dict[str, np.ndarray]], None]) -> None: ...


class InferenceServer:
    """Serves one worker over HTTP. ``start()`` runs it on a background thread.

    ``worker``: what it serves from (:class:`ServedWorker`).
    """

    def __init__(
        self,
        worker: ServedWorker,
        config: Config,
        *,
        host: str = "127.0.0.1",
        port: int = 8000,
        history_seconds: int = 900,
        sample_interval: float = 1.0,
        role: str = "single",
        max_batch_rows: int = 8192,
        max_queue_delay_ms: float = 1.0,
        batch_workers: int = 1,
        model_device: str | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
        request_timeout_s: float = 30.0,
        max_connections: int = 256,
        auth_token: str | None = None,
    ) -> None:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        self.role = role
        self.worker = worker
        self.config = config
        self.tables = {t.name: t for t in config.tables}
        self.max_keys = int(config.serving.max_lookup_keys)
        self.payloads = RequestPayloads(self.tables, self.max_keys)
        self._model: ServedModel | None = None
        # the dense model lives where the worker's rows do ("cpu" or "cuda:N")
        self.model_device = model_device or str(getattr(worker, "torch_device", "cpu"))
        self.batcher = (
            DynamicBatcher(
                self._predict_batch,
                max_batch_rows=min(int(max_batch_rows), self.max_keys),
                max_queue_delay_s=max_queue_delay_ms / 1e3,
                workers=batch_workers,
            )
            if max_batch_rows > 0 and role != "sparse"
            else None
        )
        self._model_error: str | None = None
        self._swap_lock = threading.Lock()
        self.latency = {t: Histogram(LATENCY_BUCKETS) for t in self.tables}
        self.predict_latency = Histogram(LATENCY_BUCKETS)
        self.counters = {
            "lookups": 0,
            "lookup_keys": 0,
            "predicts": 0,
            "predict_rows": 0,
            "errors": 0,
        }
        self._counter_lock = threading.Lock()
        self.history = StatusHistory(self, history_seconds, sample_interval)
        self._started = time.time()
        self._stop = threading.Event()
        if max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be >= 1, got {max_body_bytes}")
        self.max_body_bytes = int(max_body_bytes)
        if auth_token is not None and not auth_token.strip():
            raise ValueError("auth_token is empty")
        self._auth = f"Bearer {auth_token.strip()}".encode() if auth_token is not None else None
        self.httpd = GuardedHTTPServer(
            (host, port), RequestHandler, max_connections=max_connections,
            request_timeout_s=request_timeout_s,
        )  # fmt: skip
        self.httpd.app = self
        self._threads: list[threading.Thread] = []
        if role == "sparse":
            return  # lookups only: no dense model
        worker.on_dense(self._on_dense)
        current = worker.dense_model()
        if current is not None:
            self._on_dense(*current)

    # ------------------------------------------------------------------ lifecycle

    def open_connections(self) -> int:
        """Connections holding a handler thread now (at most ``max_connections``)."""
        return self.httpd.open_connections()

    def authorized(self, header: str | None) -> bool:
        """Whether an ``Authorization`` header value carries the bearer token (or none is set)."""
        if self._auth is None:
            return True
        return hmac.compare_digest((header or "").strip().encode(), self._auth)

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    @property
    def url(self) -> str:
        host = self.httpd.server_address[0]
        return f"http://{host!s}:{self.port}"

    def start(self) -> InferenceServer:
        sampler = functools.partial(self.history.run, self._stop)
        for target, name in ((self.httpd.serve_forever, "http"), (sampler, "sampler")):
            t = threading.Thread(target=target, name=f"streamhps-server-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        log.info("inference server listening on %s", self.url)
        return self

    def stop(self) -> None:
        self._stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        if self.batcher is not None:
            self.batcher.close()
        for t in self._threads:
            t.join(5)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def uptime_s(self) -> float:
        return time.time() - self._started

    def __enter__(self) -> InferenceServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ------------------------------------------------------------------ dense model

    def _on_dense(self, version: int, state: dict[str, np.ndarray]) -> None:
        try:
            model = ServedModel(state, list(self.tables), version, self.model_device)
        except ValidationError as e:
            self._model_error = str(e)
            log.error("dense update v%s refused: %s", version, e)
            return
        with self._swap_lock:
            if self._model is None or model.version >= self._model.version:
                self._model = model  # one reference swap: a request sees the old or the new model
                self._model_error = None
        log.info("dense model v%d in service", model.version)

    @property
    def model(self) -> ServedModel | None:
        return self._model

    @property
    def dense_version(self) -> int | None:
        """Version of the dense model in service, None before the first."""
        model = self._model
        return model.version if model else None

    # ------------------------------------------------------------------ lookup and predict

    def count(self, **inc: int) -> None:
        with self._counter_lock:
            for k, v in inc.items():
                self.counters[k] += v

    def counters_snapshot(self) -> dict[str, int]:
        with self._counter_lock:
            return dict(self.counters)

    def lookup(
        self, table: str, keys: np.ndarray, consistency: str, *, count: bool = True
    ) -> np.ndarray:
        t0 = time.perf_counter()
        with lookup_errors():
            out = self.worker.lookup(table, keys, consistency=consistency)
        self.latency[table].observe(time.perf_counter() - t0)
        if count:  # predict's own lookups are counted as predicts
            self.count(lookups=1, lookup_keys=int(keys.size))
        return np.asarray(out)

    def lookup_many(
        self, keys: dict[str, np.ndarray], consistency: str, *, count: bool = True
    ) -> dict[str, np.ndarray]:
        """Rows of several tables in one ``lookup_many`` of the worker (a router fans it out
        once)."""
        t0 = time.perf_counter()
        with lookup_errors():
            out = self.worker.lookup_many(keys, consistency=consistency)
        dt = time.perf_counter() - t0
        for t in keys:
            self.latency[t].observe(dt)
        if count:
            self.count(lookups=len(keys), lookup_keys=sum(int(k.size) for k in keys.values()))
        return {t: _host(out[t]) for t in keys}

    def handle_lookup_many_binary(self, query: Query, body: bytes) -> dict[str, np.ndarray]:
        keys, consistency = self.payloads.lookup_many_binary(query, body)
        return self.lookup_many(keys, consistency)

    def handle_lookup_json(self, body: Any) -> dict[str, Any]:
        table, keys, consistency = self.payloads.lookup_json(body)
        vecs = self.lookup(table, keys, consistency)
        spec = self.tables[table]
        return {"table": table, "dim": spec.dim, "dtype": spec.dtype, "vectors": vecs.tolist()}

    def handle_lookup_binary(self, query: Query, body: bytes) -> np.ndarray:
        table, keys, consistency = self.payloads.lookup_binary(query, body)
        return np.ascontiguousarray(self.lookup(table, keys, consistency))

    def predict(
        self, ids: dict[str, np.ndarray], dense: np.ndarray, consistency: str, arrival: Any = None
    ) -> tuple[np.ndarray, int]:
        """Scores ``[n]`` (float32) and the dense version that computed them; through the
        dynamic batcher when it is on."""
        t0 = time.perf_counter()
        if self.batcher is not None:
            scores, version = self.batcher.submit(ids, dense, consistency, arrival)
        else:
            scores, version = self._predict_batch(ids, dense, consistency)
        self.predict_latency.observe(time.perf_counter() - t0)
        self.count(predicts=1, predict_rows=int(dense.shape[0]))
        return scores, version

    def _predict_batch(
        self, ids: dict[str, np.ndarray], dense: np.ndarray, consistency: str
    ) -> tuple[np.ndarray, int]:
        """One (possibly merged) batch: every table's rows in ONE ``lookup_many`` of whatever
        serves them (the worker, or a main shard's router), then one forward pass of the model
        version in service when the batch starts."""
        model = self._model
        if model is None:
            why = self._model_error or "no dense model has arrived from the trainer yet"
            raise HTTPError(503, f"cannot predict: {why}", "NotReady")
        if not dense.shape[0]:
            return np.empty(0, np.float32), model.version
        with lookup_errors():
            rows = self.worker.lookup_many(
                {t: ids[t] for t in model.tables}, consistency=consistency
            )
        return model.predict(rows, dense), model.version

    def handle_predict(self, body: Any) -> dict[str, Any]:
        with self.batcher.arriving() if self.batcher else contextlib.nullcontext() as arrival:
            ids, x, consistency = self.payloads.predict_json(body, self._predict_model)
            scores, version = self.predict(ids, x, consistency, arrival)
        return {"scores": scores.tolist(), "dense_version": version}

    def handle_predict_binary(self, query: Query, body: bytes) -> tuple[np.ndarray, int]:
        with self.batcher.arriving() if self.batcher else contextlib.nullcontext() as arrival:
            ids, x, consistency = self.payloads.predict_binary(query, body, self._predict_model)
            return self.predict(ids, x, consistency, arrival)

    def _predict_model(self) -> ServedModel:
        if self.role == "sparse":
            raise HTTPError(
                404,
                "this is a sparse shard (serve --role sparse): it answers lookups only; send "
                "predicts to the main shard",
                "NotFound",
            )
        model = self._model
        if model is None:
            why = self._model_error or "no dense model has arrived from the trainer yet"
            raise HTTPError(503, f"cannot predict: {why}", "NotReady")
        return model

    # ------------------------------------------------------------------ status and metrics

    def staleness(self) -> dict[str, dict[str, dict[str, float]]]:
        raw = self.worker.staleness() or {}
        return {str(t): {str(p): dict(v) for p, v in parts.items()} for t, parts in raw.items()}

    def status(self) -> dict[str, Any]:
        ready = bool(self.worker.ready())
        model = self._model
        return {
            "ready": ready,
            "reason": None if ready else self.worker.not_ready_reason(),
            "max_staleness_s": self.config.serving.max_staleness_s,
            "uptime_s": self.uptime_s,
            "tables": {
                t.name: {
                    "dim": t.dim,
                    "dtype": t.dtype,
                    "partitions": t.partitions,
                    "missing": t.missing,
                }
                for t in self.config.tables
            },
            "staleness": self.staleness(),
            "worker": jsonable(self.worker.stats()),
            "dense_model": model.describe() if model else None,
            "dense_error": self._model_error,
            "server": self.counters_snapshot(),
        }

    def metrics(self) -> str:
        """``GET /metrics``: :func:`servers.metrics.render_metrics`."""
        return render_metrics(self)


def _host(a: Any) -> np.ndarray:
    """Rows as a numpy array (a cuda worker may answer with torch or CuPy arrays)."""
    if isinstance(a, np.ndarray):
        return a
    if hasattr(a, "detach"):  # torch
        return np.asarray(a.detach().cpu().numpy())
    if hasattr(a, "get"):  # CuPy
        return np.asarray(a.get())
    return np.asarray(a)
