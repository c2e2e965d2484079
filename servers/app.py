"""HTTP front end over one :class:`~streamhps.worker.InferenceWorker` plus the dense model.

Read-only by construction: no route writes a row (DESIGN.md invariant 8). Routes::

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

Roles (``role=``): ``single`` (default) serves one worker that holds every table; ``sparse``
serves a sharded worker's lookups only (no dense model, predict answers 404); ``main`` serves a
:class:`~streamhps.routing.ShardRouter` in place of the worker: its lookups fan out to the sparse
shards and it predicts with the dense model it follows itself.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np

from servers.batching import DynamicBatcher
from servers.model import ServedModel
from servers.status_page import PAGE
from streamhps.client import encode_layout
from streamhps.config import Config
from streamhps.errors import (
    MissingKeyError,
    NotOwnedError,
    StaleReadError,
    StreamHPSError,
    UnknownTableError,
    ValidationError,
)

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
MAX_BODY_BYTES = 64 << 20
CONSISTENCY = ("eventual", "bounded")
ROLES = ("single", "sparse", "main")

ROUTES: dict[str, tuple[str, ...]] = {
    "/": ("GET",),
    "/healthz": ("GET",),
    "/readyz": ("GET",),
    "/metrics": ("GET",),
    "/v1/status": ("GET",),
    "/v1/history": ("GET",),
    "/v1/lookup": ("POST",),
    "/v1/lookup_many": ("POST",),
    "/v1/predict": ("POST",),
    "/favicon.ico": ("GET",),
}


class HTTPError(Exception):
    """A request the server refuses: ``status`` and a message that says what was wrong."""

    def __init__(self, status: int, message: str, kind: str = "BadRequest") -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind


class Histogram:
    """A Prometheus histogram (cumulative buckets), thread-safe."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0
        self._lock = threading.Lock()

    def observe(self, v: float) -> None:
        i = bisect.bisect_left(self.buckets, v)
        with self._lock:
            self.counts[i] += 1
            self.sum += v
            self.count += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        with self._lock:
            counts, total, n = list(self.counts), self.sum, self.count
        out, acc = [], 0
        sep = "," if labels else ""
        for le, c in zip((*self.buckets, float("inf")), counts, strict=True):
            acc += c
            le_s = "+Inf" if le == float("inf") else repr(le)
            out.append(f'{name}_bucket{{{labels}{sep}le="{le_s}"}} {acc}')
        out.append(f"{name}_sum{{{labels}}} {total}" if labels else f"{name}_sum {total}")
        out.append(f"{name}_count{{{labels}}} {n}" if labels else f"{name}_count {n}")
        return out


def _stat(d: Any, *names: str) -> float | None:
    """First of ``names`` found in a (possibly nested) stats dict, summed over nesting."""
    if not isinstance(d, dict):
        return None
    for n in names:
        if n in d and isinstance(d[n], (int, float)) and not isinstance(d[n], bool):
            return float(d[n])
    found = [
        v for v in (_stat(x, *names) for x in d.values() if isinstance(x, dict)) if v is not None
    ]
    return float(sum(found)) if found else None


class InferenceServer:
    """Serves one worker over HTTP. ``start()`` runs it on a background thread.

    ``worker`` needs ``lookup``, ``ready``, ``not_ready_reason``, ``staleness``, ``stats``,
    ``dense_model`` and ``on_dense`` (the :class:`~streamhps.worker.InferenceWorker` interface).
    """

    def __init__(
        self,
        worker: Any,
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
    ) -> None:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        self.role = role
        self.worker = worker
        self.config = config
        self.tables = {t.name: t for t in config.tables}
        self.max_keys = int(config.serving.max_lookup_keys)
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
        self.history: deque[dict[str, Any]] = deque(
            maxlen=int(history_seconds / sample_interval) + 1
        )
        self.sample_interval = sample_interval
        self._last_sample: (
            tuple[float, dict[str, float], dict[str, int], dict[str, tuple[float, float]]] | None
        ) = None
        self._started = time.time()
        self._stop = threading.Event()
        self.httpd = ThreadingHTTPServer((host, port), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.app = self  # type: ignore[attr-defined]
        self._threads: list[threading.Thread] = []
        if role == "sparse":
            return  # lookups only: no dense model
        worker.on_dense(self._on_dense)
        current = worker.dense_model()
        if current is not None:
            self._on_dense(*current)

    # ------------------------------------------------------------------ lifecycle

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    @property
    def url(self) -> str:
        host = self.httpd.server_address[0]
        return f"http://{host!s}:{self.port}"

    def start(self) -> InferenceServer:
        for target, name in ((self.httpd.serve_forever, "http"), (self._sampler, "sampler")):
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

    # ------------------------------------------------------------------ handlers

    def _count(self, **inc: int) -> None:
        with self._counter_lock:
            for k, v in inc.items():
                self.counters[k] += v

    def _table(self, name: Any) -> str:
        if not isinstance(name, str):
            raise HTTPError(
                400, f"'table' must be a string naming a table, got {type(name).__name__}"
            )
        if name not in self.tables:
            raise HTTPError(
                404, f"unknown table {name!r}; tables: {sorted(self.tables)}", "UnknownTableError"
            )
        return name

    def _consistency(self, c: Any) -> str:
        if c is None:
            return "eventual"
        if c not in CONSISTENCY:
            raise HTTPError(400, f"'consistency' must be one of {list(CONSISTENCY)}, got {c!r}")
        return str(c)

    def _keys(self, raw: Any, what: str = "keys") -> np.ndarray:
        if not isinstance(raw, list):
            raise HTTPError(
                400, f"'{what}' must be a JSON array of integer ids, got {type(raw).__name__}"
            )
        if len(raw) > self.max_keys:
            raise HTTPError(413, f"{len(raw)} {what} in one request; the limit is {self.max_keys}")
        if not raw:
            return np.empty(0, dtype=np.int64)
        try:
            a = np.asarray(raw)
        except (ValueError, OverflowError) as e:
            raise HTTPError(400, f"'{what}' must be a flat array of integer ids: {e}") from None
        if a.ndim != 1 or a.dtype.kind not in "iu" or a.dtype == np.bool_:
            bad = next((x for x in raw if isinstance(x, bool) or not isinstance(x, int)), raw[0])
            raise HTTPError(
                400, f"'{what}' must be integer ids (int64); found {bad!r} ({type(bad).__name__})"
            )
        if a.dtype == np.uint64:
            return a.view(np.int64)  # ids above 2**63 keep their bit pattern, as in the publisher
        return a.astype(np.int64, copy=False)

    def lookup(
        self, table: str, keys: np.ndarray, consistency: str, *, count: bool = True
    ) -> np.ndarray:
        t0 = time.perf_counter()
        with _lookup_errors():
            out = self.worker.lookup(table, keys, consistency=consistency)
        self.latency[table].observe(time.perf_counter() - t0)
        if count:  # predict's own lookups are counted as predicts
            self._count(lookups=1, lookup_keys=int(keys.size))
        return np.asarray(out)

    def lookup_many(
        self, keys: dict[str, np.ndarray], consistency: str, *, count: bool = True
    ) -> dict[str, np.ndarray]:
        """Rows of several tables: the worker's ``lookup_many`` when it has one (one request of
        every table: a router fans it out once), else one ``lookup`` per table."""
        many = getattr(self.worker, "lookup_many", None)
        if many is None:
            return {t: self.lookup(t, k, consistency, count=count) for t, k in keys.items()}
        t0 = time.perf_counter()
        with _lookup_errors():
            out = many(keys, consistency=consistency)
        dt = time.perf_counter() - t0
        for t in keys:
            self.latency[t].observe(dt)
        if count:
            self._count(lookups=len(keys), lookup_keys=sum(int(k.size) for k in keys.values()))
        return {t: _host(out[t]) for t in keys}

    def handle_lookup_many_binary(
        self, query: dict[str, list[str]], body: bytes
    ) -> dict[str, np.ndarray]:
        names = (query.get("tables") or [""])[0].split(",")
        try:
            counts = [int(c) for c in (query.get("counts") or [""])[0].split(",")]
        except ValueError:
            raise HTTPError(
                400, "'counts' must be comma-separated key counts, one per table"
            ) from None
        if len(names) != len(counts) or not all(names) or min(counts) < 0:
            raise HTTPError(400, "give ?tables=A,B&counts=nA,nB: one count >= 0 per table")
        if len(set(names)) != len(names):
            raise HTTPError(400, f"a table appears twice in 'tables': {names}")
        tables = [self._table(t) for t in names]
        if len(body) != 8 * sum(counts):
            raise HTTPError(
                400, f"binary body is {len(body)} bytes; counts {counts} need {8 * sum(counts)}"
            )
        if sum(counts) > self.max_keys:
            raise HTTPError(413, f"{sum(counts)} keys in one request; the limit is {self.max_keys}")
        consistency = self._consistency(
            query["consistency"][0] if query.get("consistency") else None
        )
        allkeys = np.frombuffer(body, dtype="<i8").astype(np.int64, copy=False)
        bounds = np.cumsum([0, *counts])
        keys = {t: allkeys[bounds[i] : bounds[i + 1]] for i, t in enumerate(tables)}
        return self.lookup_many(keys, consistency)

    def handle_lookup_json(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise HTTPError(400, 'the body must be a JSON object {"table": ..., "keys": [...]}')
        unknown = sorted(set(body) - {"table", "keys", "consistency"})
        if unknown:
            raise HTTPError(400, f"unknown field(s) {unknown}; allowed: table, keys, consistency")
        if "table" not in body or "keys" not in body:
            raise HTTPError(400, 'the body needs "table" and "keys"')
        table = self._table(body["table"])
        keys = self._keys(body["keys"])
        vecs = self.lookup(table, keys, self._consistency(body.get("consistency")))
        spec = self.tables[table]
        return {"table": table, "dim": spec.dim, "dtype": spec.dtype, "vectors": vecs.tolist()}

    def handle_lookup_binary(
        self, query: dict[str, list[str]], body: bytes
    ) -> tuple[np.ndarray, str]:
        table = self._table(query["table"][0] if query.get("table") else None)
        consistency = self._consistency(
            query["consistency"][0] if query.get("consistency") else None
        )
        if len(body) % 8:
            raise HTTPError(
                400, f"binary body is {len(body)} bytes, not a multiple of 8 (int64 keys)"
            )
        if len(body) // 8 > self.max_keys:
            raise HTTPError(
                413, f"{len(body) // 8} keys in one request; the limit is {self.max_keys}"
            )
        keys = np.frombuffer(body, dtype="<i8").astype(np.int64, copy=False)
        vecs = self.lookup(table, keys, consistency)
        return np.ascontiguousarray(vecs), table

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
        self._count(predicts=1, predict_rows=int(dense.shape[0]))
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
        with _lookup_errors():
            rows = self.worker.lookup_many(
                {t: ids[t] for t in model.tables}, consistency=consistency
            )
        return model.predict(rows, dense), model.version

    def handle_predict(self, body: Any) -> dict[str, Any]:
        with self.batcher.arriving() if self.batcher else contextlib.nullcontext() as arrival:
            ids, x, consistency = self._predict_json(body)
            scores, version = self.predict(ids, x, consistency, arrival)
        return {"scores": scores.tolist(), "dense_version": version}

    def handle_predict_binary(
        self, query: dict[str, list[str]], body: bytes
    ) -> tuple[np.ndarray, int]:
        with self.batcher.arriving() if self.batcher else contextlib.nullcontext() as arrival:
            ids, x, consistency = self._predict_binary(query, body)
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

    def _predict_binary(
        self, query: dict[str, list[str]], body: bytes
    ) -> tuple[dict[str, np.ndarray], np.ndarray, str]:
        model = self._predict_model()
        names = [t for t in (query.get("tables") or [""])[0].split(",") if t]
        try:
            counts = [int(c) for c in (query.get("counts") or [""])[0].split(",")]
        except ValueError:
            raise HTTPError(
                400, "binary predict needs ?tables=A,B&counts=nA,nB (ids per table)"
            ) from None
        for t in names:
            self._table(t)
        if len(set(names)) != len(names) or len(counts) != len(names):
            raise HTTPError(
                400,
                f"give each table once with one count each; got tables {names}, counts {counts}",
            )
        missing = [t for t in model.tables if t not in names]
        if missing:
            raise HTTPError(
                400,
                f"'features' lacks ids for table(s) {missing}; the model uses {list(model.tables)}",
            )
        if len(set(counts)) != 1:
            raise HTTPError(
                400,
                f"every table needs one id per example; got lengths {dict(zip(names, counts, strict=True))}",
            )
        n, d = counts[0], model.num_dense
        if n < 0:
            raise HTTPError(400, f"counts must be >= 0, got {counts}")
        if n > self.max_keys:
            raise HTTPError(413, f"{n} ids per table in one request; the limit is {self.max_keys}")
        if len(body) < 8 * n * len(names):
            raise HTTPError(
                400,
                f"binary predict body is {len(body)} bytes; {n} int64 ids of each of "
                f"{len(names)} tables need {8 * n * len(names)} before the dense features",
            )
        floats, rest = divmod(len(body) - 8 * n * len(names), 4)
        if floats != n * d or rest:
            if floats == 0 and d and not rest:
                raise HTTPError(400, f"'dense' is required: [n, {d}] float32 after the ids")
            shape = (
                f"[{floats // d}, {d}]"
                if d and floats > 0 and not floats % d
                else f"{floats} values"
            )
            raise HTTPError(
                400,
                f"'dense' has shape {shape} ({len(body)} body bytes); expected [{n}, {d}] float32 "
                f"after {n} int64 ids of each of {len(names)} tables",
            )
        keys = np.frombuffer(body, dtype="<i8", count=n * len(names)).astype(np.int64, copy=False)
        ids = {t: keys[i * n : (i + 1) * n] for i, t in enumerate(names) if t in model.tables}
        x = np.frombuffer(body, dtype="<f4", offset=8 * n * len(names)).reshape(n, d)
        x = x.astype(np.float32, copy=False)
        if not np.isfinite(x).all():
            raise HTTPError(400, "'dense' contains NaN or Inf")
        consistency = self._consistency(
            query["consistency"][0] if query.get("consistency") else None
        )
        return ids, x, consistency

    def _predict_json(self, body: Any) -> tuple[dict[str, np.ndarray], np.ndarray, str]:
        if not isinstance(body, dict) or "features" not in body:
            raise HTTPError(
                400, 'the body must be a JSON object {"features": {table: [ids]}, "dense": [[...]]}'
            )
        unknown = sorted(set(body) - {"features", "dense", "consistency"})
        if unknown:
            raise HTTPError(
                400, f"unknown field(s) {unknown}; allowed: features, dense, consistency"
            )
        model = self._predict_model()
        feats = body["features"]
        if not isinstance(feats, dict):
            raise HTTPError(
                400, "'features' must be an object mapping table name to an array of ids"
            )
        for name in feats:
            self._table(name)
        missing = [t for t in model.tables if t not in feats]
        if missing:
            raise HTTPError(
                400,
                f"'features' lacks ids for table(s) {missing}; the model uses {list(model.tables)}",
            )
        ids = {t: self._keys(feats[t], f"features.{t}") for t in model.tables}
        sizes = {t: int(a.size) for t, a in ids.items()}
        if len(set(sizes.values())) != 1:
            raise HTTPError(400, f"every table needs one id per example; got lengths {sizes}")
        n = next(iter(sizes.values()))
        dense = body.get("dense")
        if model.num_dense:
            if dense is None:
                raise HTTPError(
                    400, f"'dense' is required: [n, {model.num_dense}] numbers per example"
                )
            try:
                x = np.asarray(dense, dtype=np.float32)
            except (ValueError, TypeError) as e:
                raise HTTPError(
                    400, f"'dense' must be an [n, {model.num_dense}] array of numbers: {e}"
                ) from None
            if x.shape != (n, model.num_dense):
                raise HTTPError(
                    400, f"'dense' has shape {list(x.shape)}; expected [{n}, {model.num_dense}]"
                )
            if not np.isfinite(x).all():
                raise HTTPError(400, "'dense' contains NaN or Inf")
        else:
            x = np.zeros((n, 0), dtype=np.float32)
        return ids, x, self._consistency(body.get("consistency"))

    # ------------------------------------------------------------------ status and metrics

    def _staleness(self) -> dict[str, dict[str, dict[str, float]]]:
        raw = self.worker.staleness() or {}
        return {str(t): {str(p): dict(v) for p, v in parts.items()} for t, parts in raw.items()}

    def status(self) -> dict[str, Any]:
        ready = bool(self.worker.ready())
        model = self._model
        return {
            "ready": ready,
            "reason": None if ready else self.worker.not_ready_reason(),
            "max_staleness_s": self.config.serving.max_staleness_s,
            "uptime_s": time.time() - self._started,
            "tables": {
                t.name: {
                    "dim": t.dim,
                    "dtype": t.dtype,
                    "partitions": t.partitions,
                    "missing": t.missing,
                }
                for t in self.config.tables
            },
            "staleness": self._staleness(),
            "worker": _jsonable(self.worker.stats()),
            "dense_model": model.describe() if model else None,
            "dense_error": self._model_error,
            "server": dict(self.counters),
        }

    def _sample(self) -> dict[str, Any]:
        now = time.time()
        stal = self._staleness()
        stats = self.worker.stats() or {}
        per_table = stats.get("tables", stats) if isinstance(stats, dict) else {}
        rows: dict[str, float] = {}
        looked: dict[str, tuple[float, float]] = {}
        for t in self.tables:
            ts = per_table.get(t, {}) if isinstance(per_table, dict) else {}
            r = _stat(ts, "rows_applied", "rows")
            rows[t] = r if r is not None else 0.0
            looked[t] = (_stat(ts, "hits") or 0.0, _stat(ts, "misses") or 0.0)
        with self._counter_lock:
            counters = dict(self.counters)
        sample: dict[str, Any] = {
            "t": now,
            "ready": bool(self.worker.ready()),
            "staleness_s": {
                t: max((p.get("seconds", 0.0) for p in ps.values()), default=0.0)
                for t, ps in stal.items()
            },
            "versions_behind": {
                t: max((p.get("versions_behind", 0) for p in ps.values()), default=0)
                for t, ps in stal.items()
            },
            "applied_version": {
                t: min((p.get("applied_version", 0) or 0 for p in ps.values()), default=0)
                for t, ps in stal.items()
            },
            "hit_ratio": {},
            "ingest_rows_per_s": {},
            "dense_version": self._model.version if self._model else None,
        }
        if self._last_sample is not None:
            t_prev, rows_prev, c_prev, looked_prev = self._last_sample
            dt = max(now - t_prev, 1e-6)
            # hit ratio of the lookups made since the last sample (None when there were none)
            for t, (h, m) in looked.items():
                dh = h - looked_prev.get(t, (0.0, 0.0))[0]
                dm = m - looked_prev.get(t, (0.0, 0.0))[1]
                sample["hit_ratio"][t] = dh / (dh + dm) if dh + dm > 0 else None
            sample["ingest_rows_per_s"] = {
                t: max(0.0, (rows[t] - rows_prev.get(t, 0.0)) / dt) for t in rows
            }
            sample["lookups_per_s"] = (counters["lookups"] - c_prev["lookups"]) / dt
            sample["predicts_per_s"] = (counters["predicts"] - c_prev["predicts"]) / dt
            sample["errors_per_s"] = (counters["errors"] - c_prev["errors"]) / dt
        self._last_sample = (now, rows, counters, looked)
        return sample

    def _sampler(self) -> None:
        while not self._stop.is_set():
            try:
                self.history.append(self._sample())
            except Exception:  # noqa: BLE001 - a failed sample must not stop the charts
                log.exception("status sample failed")
            self._stop.wait(self.sample_interval)

    def history_view(self, seconds: float) -> dict[str, Any]:
        cutoff = time.time() - seconds
        ready = bool(self.worker.ready())
        return {
            "ready": ready,
            "reason": None if ready else self.worker.not_ready_reason(),
            "max_staleness_s": self.config.serving.max_staleness_s,
            "uptime_s": time.time() - self._started,
            "dense_version": self._model.version if self._model else None,
            "samples": [s for s in list(self.history) if s["t"] >= cutoff],
        }

    def metrics(self) -> str:
        lines: list[str] = []

        def family(name: str, kind: str, help_: str) -> None:
            lines.append(f"# HELP {name} {help_}")
            lines.append(f"# TYPE {name} {kind}")

        stal = self._staleness()
        for key, name, help_ in (
            (
                "seconds",
                "streamhps_staleness_seconds",
                "Seconds behind the stream head (publish time of the oldest unapplied message).",
            ),
            (
                "versions_behind",
                "streamhps_staleness_versions",
                "Committed versions not yet applied.",
            ),
            ("applied_version", "streamhps_applied_version", "Last commit marker fully applied."),
            (
                "lag_messages",
                "streamhps_lag_messages",
                "Messages between the worker's position and the head.",
            ),
        ):
            family(name, "gauge", help_)
            for t, parts in stal.items():
                for p, v in parts.items():
                    val = v.get(key)
                    if val is not None:
                        lines.append(f'{name}{{table="{t}",partition="{p}"}} {float(val)}')
        family("streamhps_ready", "gauge", "1 when within the staleness bound.")
        lines.append(f"streamhps_ready {int(bool(self.worker.ready()))}")
        last = self.history[-1] if self.history else {}
        family("streamhps_cache_hit_ratio", "gauge", "Cache hits / lookups.")
        for t, h in (last.get("hit_ratio") or {}).items():
            if h is not None:
                lines.append(f'streamhps_cache_hit_ratio{{table="{t}"}} {h}')
        stats = self.worker.stats() or {}
        per_table = stats.get("tables", {}) if isinstance(stats, dict) else {}
        family(
            "streamhps_cache_lookups_total", "counter", "Keys looked up in the cache, by result."
        )
        for t in self.tables:
            ts = per_table.get(t, {})
            for key, result in (("hits", "hit"), ("misses", "miss")):
                n = _stat(ts, key)
                if n is not None:
                    lines.append(
                        f'streamhps_cache_lookups_total{{table="{t}",result="{result}"}} {int(n)}'
                    )
        family("streamhps_ingest_rows_total", "counter", "Rows applied from the stream.")
        for t in self.tables:
            n = _stat(per_table.get(t, {}), "rows_applied")
            if n is not None:
                lines.append(f'streamhps_ingest_rows_total{{table="{t}"}} {int(n)}')
        family(
            "streamhps_ingest_rows_per_second", "gauge", "Rows applied from the stream per second."
        )
        for t, r in (last.get("ingest_rows_per_s") or {}).items():
            lines.append(f'streamhps_ingest_rows_per_second{{table="{t}"}} {r}')
        rejected = stats.get("rejected") if isinstance(stats, dict) else None
        family(
            "streamhps_rejected_messages_total", "counter",
            "Messages the worker skipped (the processor dead-letters them), by reason.",
        )  # fmt: skip
        for reason, n in sorted(((rejected or {}).get("by_reason") or {}).items()):
            lines.append(f'streamhps_rejected_messages_total{{reason="{reason}"}} {int(n)}')
        family(
            "streamhps_lookup_latency_seconds", "histogram", "Worker lookup latency per request."
        )
        for t, h in self.latency.items():
            lines.extend(h.lines("streamhps_lookup_latency_seconds", f'table="{t}"'))
        family("streamhps_predict_latency_seconds", "histogram", "Predict request latency.")
        lines.extend(self.predict_latency.lines("streamhps_predict_latency_seconds"))
        family(
            "streamhps_dense_version", "gauge", "Version of the dense model in service (0: none)."
        )
        lines.append(f"streamhps_dense_version {self._model.version if self._model else 0}")
        with self._counter_lock:
            counters = dict(self.counters)
        family("streamhps_requests_total", "counter", "Requests served, by kind.")
        for k in ("lookups", "predicts", "errors"):
            lines.append(f'streamhps_requests_total{{kind="{k}"}} {counters[k]}')
        return "\n".join(lines) + "\n"


@contextlib.contextmanager
def _lookup_errors() -> Iterator[None]:
    """Worker errors of a lookup as the HTTP answers clients map back to exceptions."""
    try:
        yield
    except MissingKeyError as e:
        raise HTTPError(404, str(e), "MissingKeyError") from None
    except NotOwnedError as e:  # 421 Misdirected Request: ask the shard that serves the key
        raise HTTPError(421, str(e), "NotOwnedError") from None
    except StaleReadError as e:  # ShardUnavailableError too (a main whose shard is down)
        raise HTTPError(503, str(e), type(e).__name__) from None
    except UnknownTableError as e:
        raise HTTPError(404, str(e), "UnknownTableError") from None


def _host(a: Any) -> np.ndarray:
    """Rows as a numpy array (a cuda worker may answer with torch or CuPy arrays)."""
    if isinstance(a, np.ndarray):
        return a
    if hasattr(a, "detach"):  # torch
        return np.asarray(a.detach().cpu().numpy())
    if hasattr(a, "get"):  # CuPy
        return np.asarray(a.get())
    return np.asarray(a)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "streamhps"
    # Headers and body go out in separate writes; with Nagle on, the body waits for the
    # client's delayed ACK (~40 ms per keep-alive request).
    disable_nagle_algorithm = True

    @property
    def app(self) -> InferenceServer:
        return self.server.app  # type: ignore[attr-defined]

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
            if self.app._stop.is_set():  # a keep-alive connection outliving stop()
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
            self.app._count(errors=1)
            extra = {"Allow": ", ".join(ROUTES[path])} if e.status == 405 else {}
            self._json(e.status, {"error": {"type": e.kind, "message": str(e)}}, extra)
        except StreamHPSError as e:
            self.app._count(errors=1)
            self._json(500, {"error": {"type": type(e).__name__, "message": str(e)}})
        except Exception as e:  # noqa: BLE001 - answer 500 with the reason rather than drop the connection
            log.exception("request %s %s failed", method, self.path)
            self.app._count(errors=1)
            self._json(
                500, {"error": {"type": "ServerError", "message": f"{type(e).__name__}: {e}"}}
            )

    def _read_body(self) -> bytes:
        n = self.headers.get("Content-Length")
        if not n:
            return b""
        try:
            size = int(n)
        except ValueError:
            raise HTTPError(400, f"Content-Length {n!r} is not a number") from None
        if size > MAX_BODY_BYTES:
            self.close_connection = True
            raise HTTPError(
                413, f"request body of {size} bytes is over the {MAX_BODY_BYTES}-byte limit"
            )
        return self.rfile.read(size)

    def _json_body(self, body: bytes) -> Any:
        ctype = (self.headers.get("Content-Type") or "application/json").split(";")[0].strip()
        if ctype != "application/json":
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
        if path == "/":
            self._send(200, PAGE.encode(), "text/html; charset=utf-8")
        elif path == "/favicon.ico":
            self._send(204, b"", "image/x-icon")  # browsers ask; not an error
        elif path == "/healthz":
            self._json(200, {"status": "ok"})
        elif path == "/readyz":
            ready = bool(app.worker.ready())
            if ready:
                self._json(200, {"ready": True})
            else:
                self._json(503, {"ready": False, "reason": app.worker.not_ready_reason()})
        elif path == "/metrics":
            self._send(200, app.metrics().encode(), "text/plain; version=0.0.4; charset=utf-8")
        elif path == "/v1/status":
            self._json(200, app.status())
        elif path == "/v1/history":
            try:
                seconds = float((query.get("seconds") or ["300"])[0])
            except ValueError:
                raise HTTPError(400, "'seconds' must be a number") from None
            self._json(200, app.history_view(seconds))
        elif path == "/v1/lookup":
            ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip()
            if ctype == "application/octet-stream":
                vecs, _table = app.handle_lookup_binary(query, body)
                self._send(
                    200, vecs.astype(vecs.dtype.newbyteorder("<"), copy=False).tobytes(), "application/octet-stream",
                    {"X-Streamhps-Dtype": vecs.dtype.newbyteorder("<").str,
                     "X-Streamhps-Shape": f"{vecs.shape[0]},{vecs.shape[1] if vecs.ndim == 2 else 0}"},
                )  # fmt: skip
            else:
                self._json(200, app.handle_lookup_json(self._json_body(body)), clean=True)
        elif path == "/v1/lookup_many":
            ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip()
            if ctype != "application/octet-stream":
                raise HTTPError(415, "/v1/lookup_many takes application/octet-stream int64 keys")
            rows = app.handle_lookup_many_binary(query, body)
            data = b"".join(
                np.ascontiguousarray(a.astype(a.dtype.newbyteorder("<"), copy=False)).tobytes()
                for a in rows.values()
            )
            self._send(200, data, "application/octet-stream",
                       {"X-Streamhps-Layout": encode_layout(rows)})  # fmt: skip
        elif path == "/v1/predict":
            ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip()
            if ctype == "application/octet-stream":
                scores, version = app.handle_predict_binary(query, body)
                self._send(200, scores.astype("<f4").tobytes(), "application/octet-stream",
                           {"X-Streamhps-Dense-Version": str(version),
                            "X-Streamhps-Shape": str(scores.shape[0])})  # fmt: skip
            else:
                self._json(200, app.handle_predict(self._json_body(body)), clean=True)

    def _json(
        self, status: int, obj: Any, headers: dict[str, str] | None = None, *, clean: bool = False
    ) -> None:
        """``clean=True``: ``obj`` holds only JSON types already (rows via ``tolist()``): skip the
        per-element walk, which costs more than the encoding on large answers."""
        data = json.dumps(
            obj if clean else _jsonable(obj), separators=(",", ":"), allow_nan=False
        ).encode()
        self._send(status, data, "application/json", headers)

    def _send(
        self,
        status: int,
        data: bytes | memoryview,
        ctype: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status, HTTPStatus(status).phrase)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
