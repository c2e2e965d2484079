"""The main shard: fans each request's lookups out to the sparse shards and holds the dense model.

::

    router = ShardRouter(config, "placement.json", ["http://127.0.0.1:8001", "http://127.0.0.1:8002"])
    router.start(); router.wait_ready(30)
    rows = router.lookup_many({"user": u, "item": i})    # split by owner, parallel, merged in order
    router.ready(); router.not_ready_reason(); router.staleness(); router.stats()
    router.dense_model(); router.on_dense(callback)      # followed from <prefix>.dense itself
    router.stop()

A :class:`ShardRouter` has the interface of an :class:`~streamhps.worker.InferenceWorker` that
the inference server uses (``lookup``, ``lookup_many``, ``ready``, ``not_ready_reason``,
``staleness``, ``stats``, ``dense_model``, ``on_dense``), so ``streamhps serve --role main``
is the same server over a router instead of a worker.

Routing (:class:`~streamhps.client.ShardedClient`): a key goes to the shard that serves its
partition in the placement; each shard involved gets one multi-table request; the requests run
in parallel and the rows are put back in request order.

Health: a monitor thread asks every shard's ``/readyz`` each ``health_interval_s``. The main is
ready when every shard is; otherwise :meth:`not_ready_reason` names the first shard that is not
(unreachable, or its own reason: staleness past the bound, not caught up). Staleness is each
partition's row from the shard that serves it, so a table's worst partition is the worst of its
shards. A lookup that needs an unreachable shard raises
:class:`~streamhps.errors.ShardUnavailableError` (a ``StaleReadError``): bounded reads refuse, and
so do eventual ones, since nothing else holds those rows.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from confluent_kafka import OFFSET_BEGINNING, KafkaException, TopicPartition

from streamhps.client import InferenceClient, ShardedClient
from streamhps.config import Config, dense_topic
from streamhps.errors import ServerError, StaleReadError, StreamHPSError
from streamhps.kafka import make_consumer
from streamhps.placement import Placement
from streamhps.validation import Rejected, check_dense_message

log = logging.getLogger(__name__)

DenseCallback = Any  # Callable[[int, dict[str, np.ndarray]], None]


class DenseFollower:
    """Follows ``<prefix>.dense`` from its newest message on a background thread."""

    def __init__(self, config: Config, kafka_config: Mapping[str, Any] | None = None) -> None:
        self.topic = dense_topic(config.topic_prefix)
        self.kafka = {**config.kafka, **dict(kafka_config or {})}
        self.dense: tuple[int, dict[str, np.ndarray]] | None = None
        self.callbacks: list[DenseCallback] = []
        self.error: BaseException | None = None
        self.updates = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._consumer: Any = None

    def start(self) -> None:
        from streamhps.worker.core import CONSUMER_DEFAULTS

        self._consumer = make_consumer(
            self.kafka,
            defaults=CONSUMER_DEFAULTS,
            overrides={"group.id": f"streamhps-main-{uuid.uuid4().hex[:12]}"},
        )
        tp = TopicPartition(self.topic, 0)
        try:
            lo, hi = self._consumer.get_watermark_offsets(tp, timeout=10)
            tp.offset = hi - 1 if hi > lo else OFFSET_BEGINNING  # only the newest model matters
        except KafkaException as e:
            log.warning("cannot read the watermarks of %s (%s); reading from the start", tp, e)
            tp.offset = OFFSET_BEGINNING
        self._consumer.assign([tp])
        self._thread = threading.Thread(target=self._run, name="streamhps-dense", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        if self._consumer is not None:
            try:
                self._consumer.close()
            except (KafkaException, RuntimeError) as e:
                log.warning("closing the dense-model consumer: %s", e)
            self._consumer = None

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                for m in self._consumer.consume(num_messages=16, timeout=0.1):
                    if m.error() is None:
                        self._apply(m.value())
        except BaseException as e:  # noqa: BLE001 - reported through the router's stats
            self.error = e
            log.exception("dense-model consumer failed")

    def _apply(self, value: bytes) -> None:
        dec = check_dense_message(value)
        if isinstance(dec, Rejected):
            log.warning("skipped a message on %s (%s): %s", self.topic, dec.reason, dec.detail)
            return
        if self.dense is not None and dec.version <= self.dense[0]:
            return
        self.dense = (dec.version, dec.tensors)
        self.updates += 1
        log.info("dense model version %d received (%d tensors)", dec.version, len(dec.tensors))
        for cb in list(self.callbacks):
            try:
                cb(dec.version, dec.tensors)
            except Exception:  # noqa: BLE001 - a bad callback must not stop following
                log.exception("dense-model callback %r failed", cb)


class ShardRouter(ShardedClient):
    """The main shard's worker: routes lookups over sparse shards by ``placement``.

    ``urls[i]`` is the address of shard ``i``. ``follow_dense``: consume the dense-model topic
    (the main holds the dense model). ``health_interval_s``: how often every shard's readiness
    is asked. ``timeout``: seconds a shard may take to answer a lookup.
    """

    def __init__(
        self,
        config: Config,
        placement: Placement | str | os.PathLike[str],
        urls: Sequence[str],
        *,
        follow_dense: bool = True,
        health_interval_s: float = 0.2,
        timeout: float = 10.0,
        kafka_config: Mapping[str, Any] | None = None,
        token: str | None = None,
    ) -> None:
        super().__init__(placement, urls, timeout=timeout, token=token)
        self.placement.check(config)
        self.config = config
        self.health_interval_s = health_interval_s
        # readiness probes answer at once or the shard counts as down
        self._health_clients = [
            InferenceClient(u, timeout=max(0.5, 5 * health_interval_s), token=token)
            for u in self.urls
        ]
        self._health: list[tuple[bool, str | None]] = [(False, "not asked yet")] * len(self.urls)
        self._health_at = 0.0
        self._dense = DenseFollower(config, kafka_config) if follow_dense else None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = False
        self._stopped = False
        self._status_cache: tuple[float, list[dict[str, Any] | None]] = (0.0, [])
        self._status_lock = threading.Lock()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> ShardRouter:
        if self._started:
            return self
        self._started = True
        self._poll_health()
        if self._dense is not None:
            self._dense.start()
        self._thread = threading.Thread(
            target=self._health_loop, name="streamhps-health", daemon=True
        )
        self._thread.start()
        log.info("main shard routing over %d sparse shards: %s", len(self.urls), self.urls)
        return self

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._dense is not None:
            self._dense.stop()
        for c in self._health_clients:
            c.close()
        self.close()

    def __enter__(self) -> ShardRouter:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ------------------------------------------------------------------ health

    def _poll_health(self) -> None:
        def ask(c: InferenceClient) -> tuple[bool, str | None]:
            try:
                return c.ready()
            except ServerError as e:
                return False, f"unreachable: {e}"
            except Exception as e:  # noqa: BLE001 - a garbled answer is a shard that is not ready
                return False, f"bad /readyz answer: {type(e).__name__}: {e}"

        self._health = list(self._pool.map(ask, self._health_clients))
        self._health_at = time.monotonic()

    def _health_loop(self) -> None:
        while not self._stop.wait(self.health_interval_s):
            try:
                self._poll_health()
            except Exception:  # noqa: BLE001 - keep monitoring
                log.exception("shard health poll failed")

    def shard_states(self) -> list[tuple[bool, str | None]]:
        """(ready, reason) of every shard as of the last health poll."""
        return list(self._health)

    def not_ready_reason(self) -> str | None:
        if not self._started:
            return "not started"
        if self._stopped:
            return "stopped"
        age = time.monotonic() - self._health_at
        if age > max(5.0, 20 * self.health_interval_s):
            return f"shard health not polled for {age:.1f}s"
        for s, (ok, reason) in enumerate(self._health):
            if not ok:
                return f"shard {s} ({self.urls[s]}) is not ready: {reason}"
        return None

    def wait_ready(self, timeout: float = 60.0, *, interval: float = 0.05) -> None:
        """Block until every shard is ready; :class:`StaleReadError` naming one after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            reason = self.not_ready_reason()
            if reason is None:
                return
            if time.monotonic() >= deadline or reason in ("not started", "stopped"):
                raise StaleReadError(f"main shard not ready after {timeout:.1f}s: {reason}")
            time.sleep(interval)

    def _statuses(self, max_age: float = 0.5) -> list[dict[str, Any] | None]:
        """Every shard's ``/v1/status`` (None where unreachable), cached ``max_age`` seconds."""
        with self._status_lock:
            at, cached = self._status_cache
            if cached and time.monotonic() - at < max_age:
                return cached

            def ask(c: InferenceClient) -> dict[str, Any] | None:
                try:
                    return c.status()
                except StreamHPSError:
                    return None

            got = list(self._pool.map(ask, self._health_clients))
            self._status_cache = (time.monotonic(), got)
            return got

    def staleness(self) -> dict[str, dict[int, dict[str, Any]]]:
        """Per table, per partition, from the shard serving it; a partition of an unreachable
        shard reads ``seconds = inf`` (nothing known about it)."""
        merged: dict[str, dict[int, dict[str, Any]]] = {}
        for s, status in enumerate(self._statuses()):
            if status is None:
                for t, ps in self.placement.partitions_of(s).items():
                    for p in ps:
                        merged.setdefault(t, {})[p] = {"seconds": float("inf"), "shard": s,
                                                       "reachable": False}  # fmt: skip
                continue
            for t, ps in (status.get("staleness") or {}).items():
                for p, row in ps.items():
                    row = dict(row)
                    if row.get("seconds") is None:  # JSON has no inf: the shard sent null
                        row["seconds"] = float("inf")
                    merged.setdefault(t, {})[int(p)] = {**row, "shard": s}
        return {t: dict(sorted(ps.items())) for t, ps in merged.items()}

    def stats(self) -> dict[str, Any]:
        """The shards' counters summed per table, each shard's summary, and the fan-out's."""
        tables: dict[str, dict[str, float]] = {}
        shards = []
        for s, status in enumerate(self._statuses()):
            ok, reason = self._health[s]
            summary: dict[str, Any] = {
                "shard": s, "url": self.urls[s], "ready": ok, "reason": reason,
                "partitions": {t: list(ps) for t, ps in self.placement.partitions_of(s).items()},
            }  # fmt: skip
            worker = (status or {}).get("worker") or {}
            for t, ts in (worker.get("tables") or {}).items():
                acc = tables.setdefault(t, {"rows_applied": 0, "hits": 0, "misses": 0})
                cache = ts.get("cache") or {}
                acc["rows_applied"] += ts.get("rows_applied") or 0
                acc["hits"] += cache.get("hits") or 0
                acc["misses"] += cache.get("misses") or 0
            summary["lookups"] = worker.get("lookups")
            shards.append(summary)
        with self._stats_lock:
            fanout = dict(self.counters)
        out: dict[str, Any] = {
            "ready": self.ready(),
            "not_ready_reason": self.not_ready_reason(),
            "role": "main",
            "tables": tables,
            "shards": shards,
            "fanout": fanout,
            "placement": {"strategy": self.placement.strategy, "shards": self.placement.n_shards},
        }
        if self._dense is not None:
            out["dense"] = {
                "updates": self._dense.updates,
                "error": None if self._dense.error is None else str(self._dense.error),
            }
        return out

    # ------------------------------------------------------------------ dense model

    def dense_model(self) -> tuple[int, dict[str, np.ndarray]] | None:
        """The newest dense model received: ``(version, name -> array)``, or None."""
        return self._dense.dense if self._dense is not None else None

    def on_dense(self, callback: DenseCallback) -> None:
        """Call ``callback(version, tensors)`` for every newer dense model (now, if there is one)."""
        if self._dense is None:
            return
        self._dense.callbacks.append(callback)
        current = self._dense.dense
        if current is not None:
            callback(*current)
