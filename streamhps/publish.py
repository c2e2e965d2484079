"""The trainer's publish API.

::

    spec = TableSpec(name="user", dim=64, dtype="float32", partitions=4)
    with Publisher(bootstrap_servers="127.0.0.1:9092", tables=[spec], topic_prefix="demo") as pub:
        pub.create_topics()
        pub.publish("user", keys, vectors, version=7)
        pub.commit(7)                      # "7 complete" marker on every partition, then flush
        pub.publish_dense(model.state_dict(), version=7)
        pub.flush()                        # raises PublishError unless every message was acked

A restarted trainer resumes its numbering: before its first publish the publisher learns the
highest committed version of each table from the commit markers on the stream
(:mod:`streamhps.committed`), refuses anything not above it, and tells it
(``pub.committed_version("user")``)::

    start = (pub.committed_version("user") or 0) + 1

Pass ``last_committed_version=`` (one version, or table -> version) to say where to resume
without reading the stream, or ``learn_committed=False`` to start a new numbering on purpose
(every tier keeps the newer rows it holds: rows at lower versions are dropped as older).

Rows are grouped by partition (:func:`streamhps.partitioning.partition_of`) and cut into
messages under 1 MiB. The producer is idempotent (``enable.idempotence``, ``acks=all``), so
broker-side retries neither duplicate nor reorder messages within a partition. Every call
validates its input before sending anything: a refused call sends nothing.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from confluent_kafka import KafkaError

from streamhps import wire
from streamhps.committed import read_committed_versions
from streamhps.config import Config, TableSpec, dense_topic, table_topic
from streamhps.errors import PublishError, UnknownTableError, ValidationError, VersionError
from streamhps.kafka import client_config, make_producer
from streamhps.keys import as_int64_keys
from streamhps.partitioning import partition_of
from streamhps.topics import ensure_topics, planned_topics

log = logging.getLogger(__name__)

_HEADER_ALLOWANCE = 1024  # bytes of envelope header budgeted per message


@dataclass
class PublishStats:
    rows: int = 0
    messages: int = 0
    bytes: int = 0
    acked: int = 0
    failed: int = 0
    committed_version: int | None = None


class Publisher:
    """Publishes embedding rows, commit markers and dense models to Kafka. Thread-compatible
    (one thread at a time); use one Publisher per trainer process."""

    def __init__(
        self,
        bootstrap_servers: str | None = None,
        tables: Iterable[TableSpec] = (),
        topic_prefix: str = "streamhps",
        kafka_config: Mapping[str, Any] | None = None,
        *,
        run_id: str | None = None,
        max_message_bytes: int = wire.MAX_MESSAGE_BYTES,
        last_committed_version: int | Mapping[str, int] | None = None,
        learn_committed: bool = True,
        learn_timeout: float = 30.0,
    ) -> None:
        self.tables: dict[str, TableSpec] = {t.name: t for t in tables}
        if not self.tables:
            raise ValidationError("Publisher needs at least one TableSpec in tables=[...]")
        self.topic_prefix = topic_prefix
        conf = client_config(dict(kafka_config or {}), "producer")
        if bootstrap_servers:
            conf["bootstrap.servers"] = bootstrap_servers
        if "bootstrap.servers" not in conf:
            raise ValidationError("no bootstrap.servers: pass bootstrap_servers= or kafka_config")
        self.kafka_config = conf
        self.run_id = run_id or uuid.uuid4().hex[:16]
        self.max_message_bytes = max_message_bytes
        # table -> committed version; None until learned (lazily: topics may not exist yet)
        self._committed: dict[str, int] | None = None
        self._committed_source = "this publisher"
        if isinstance(last_committed_version, Mapping):
            self._committed = {t: int(v) for t, v in last_committed_version.items()}
            self._committed_source = "last_committed_version="
        elif last_committed_version is not None:
            self._committed = {t: int(last_committed_version) for t in self.tables}
            self._committed_source = "last_committed_version="
        elif not learn_committed:
            self._committed = {}
        self.learn_timeout = learn_timeout
        self.stats = PublishStats(
            committed_version=max(self._committed.values()) if self._committed else None
        )
        self._max_published_version = 0  # of the rows this publisher sent
        self._seq = 0
        self._errors: list[str] = []
        self._lock = threading.Lock()
        self._producer = make_producer(conf)
        self._closed = False

    @classmethod
    def from_config(cls, config: Config, **kwargs: Any) -> Publisher:
        return cls(
            tables=config.tables, topic_prefix=config.topic_prefix, kafka_config=config.kafka,
            **kwargs,
        )  # fmt: skip

    def committed_version(self, table: str) -> int | None:
        """The highest version committed for ``table``: learned from the stream's commit markers
        on first use (see the module docstring), then raised by every :meth:`commit`. None if
        nothing was ever committed. A restarted trainer continues at this + 1."""
        self._spec(table)
        return self._committed_versions().get(table)

    # ------------------------------------------------------------------ topics

    def create_topics(self, timeout: float = 15.0) -> list[str]:
        """Create the table, ``.dlq`` and ``.dense`` topics that are missing (idempotent).

        Raises :class:`~streamhps.errors.TopicError` if one exists with another partition count.
        """
        return ensure_topics(
            self.kafka_config, planned_topics(self.topic_prefix, self.tables.values()),
            timeout=timeout,
        )  # fmt: skip

    # ------------------------------------------------------------------ publish

    def publish(
        self,
        table: str,
        keys: Any,
        vectors: Any,
        version: int,
        *,
        row_versions: Any | None = None,
    ) -> int:
        """Queue rows of ``table`` at ``version``; returns the number of messages queued.

        ``keys``: int64 (or uint64, taken as its bit pattern) ``[n]``, unique within the call;
        ``vectors``: ``[n, dim]`` of the table's dtype, finite. Nothing is sent if any check
        fails. Delivery is confirmed by :meth:`flush` / :meth:`commit`.
        """
        spec = self._spec(table)
        _check_version_type(version, what="publish")
        keys_a = _as_keys(keys)
        vec = np.asarray(vectors)
        if vec.ndim != 2 or vec.shape[1] != spec.dim:
            raise ValidationError(
                f"table {table!r} has dim {spec.dim}; vectors have shape {vec.shape} "
                f"(expected [n, {spec.dim}])"
            )
        if vec.dtype != spec.np_dtype:
            raise ValidationError(
                f"table {table!r} stores {spec.dtype}; vectors are {vec.dtype}. "
                f"Convert with vectors.astype(np.{spec.dtype})"
            )
        if vec.shape[0] != keys_a.shape[0]:
            raise ValidationError(
                f"{keys_a.shape[0]} keys but {vec.shape[0]} vectors: one vector per key"
            )
        rv = None
        if row_versions is not None:
            rv = np.asarray(row_versions)
            if rv.shape != keys_a.shape or rv.dtype.kind not in "iu":
                raise ValidationError(f"row_versions must be integers of shape {keys_a.shape}")
            rv = rv.astype(np.int64, copy=False)
            if rv.size and (rv.min() <= 0 or rv.max() > version):
                raise VersionError("row_versions must be in 1..version")
        n = keys_a.shape[0]
        if n == 0:
            return 0
        if not wire.all_finite(vec):
            bad = np.flatnonzero(~np.isfinite(vec).all(axis=1))
            raise ValidationError(
                f"vectors of {bad.size} row(s) contain NaN or Inf (first: key {int(keys_a[bad[0]])}, "
                f"row {int(bad[0])}); nothing was sent"
            )
        sorted_keys = np.sort(keys_a)
        dup = sorted_keys[1:][sorted_keys[1:] == sorted_keys[:-1]]
        if dup.size:
            raise ValidationError(
                f"{dup.size} duplicate key(s) in one publish call (first: {int(dup[0])}); "
                "send each key once per call with its latest vector"
            )
        # Checked last: the first check reads the committed versions from the broker.
        self._check_above_committed(table, version, what="publish")
        if rv is not None and rv.size:
            committed = self.committed_version(table)
            if committed is not None and rv.min() <= committed:
                raise VersionError(
                    f"row_versions go down to {rv.min()}, at or below the committed version "
                    f"{committed} of table {table!r}"
                )

        # int16 partitions let numpy's stable sort use radix sort: O(n).
        parts = partition_of(keys_a, spec.partitions).astype(np.int16)
        order = np.argsort(parts, kind="stable")
        counts = np.bincount(parts, minlength=spec.partitions)
        vec_c = np.ascontiguousarray(vec)
        row_bytes = 8 + spec.row_bytes + (8 if rv is not None else 0)
        rows_per_msg = max(1, (self.max_message_bytes - _HEADER_ALLOWANCE) // row_bytes)
        topic = table_topic(self.topic_prefix, table)
        sent = 0
        start = 0
        for p, count in enumerate(counts.tolist()):
            for lo in range(start, start + count, rows_per_msg):
                hi = min(lo + rows_per_msg, start + count)
                payload = wire.encode_update_rows(
                    table, keys_a, vec_c, order[lo:hi], version, partition=p, row_versions=rv,
                    run_id=self.run_id, producer_seq=self._next_seq(),
                )  # fmt: skip
                self._produce(topic, p, payload, rows=hi - lo)
                sent += 1
            start += count
        self._max_published_version = max(self._max_published_version, version)
        return sent

    def commit(
        self, version: int, *, tables: Iterable[str] | None = None, timeout: float | None = None
    ) -> None:
        """Mark ``version`` complete: a marker on every partition of each table, then :meth:`flush`.

        Returns only once every row published so far and every marker was acknowledged;
        raises :class:`PublishError` otherwise. A consumer's applied version of a partition is
        the last marker it has fully applied.
        """
        names = list(tables) if tables is not None else list(self.tables)
        specs = [self._spec(n) for n in names]
        _check_version_type(version, what="commit")
        if self._committed is not None:  # known already: the clearer error first
            for spec in specs:
                self._check_above_committed(spec.name, version, what="commit")
        if version < self._max_published_version:
            raise VersionError(
                f"commit({version}) after rows of version {self._max_published_version} were "
                f"published; commit {self._max_published_version} (or higher) instead"
            )
        for spec in specs:
            self._check_above_committed(spec.name, version, what="commit")
        for spec in specs:
            topic = table_topic(self.topic_prefix, spec.name)
            for p in range(spec.partitions):
                payload = wire.encode_marker(
                    spec.name, version, partition=p, dtype=spec.dtype, dim=spec.dim,
                    run_id=self.run_id, producer_seq=self._next_seq(),
                )  # fmt: skip
                self._produce(topic, p, payload, rows=0)
        self.flush(timeout)
        self.stats.committed_version = version
        committed = self._committed_versions()
        for spec in specs:
            committed[spec.name] = version
        self._committed_source = "this publisher"
        self._max_published_version = version
        log.info("committed version %d on %d table(s)", version, len(specs))

    def publish_dense(self, state: Mapping[str, Any], version: int) -> None:
        """Queue the whole dense model (name -> tensor/array) at ``version`` on ``<prefix>.dense``."""
        if isinstance(version, bool) or not isinstance(version, (int, np.integer)) or version <= 0:
            raise VersionError(f"version must be a positive integer, got {version!r}")
        for name, t in state.items():
            a = t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)
            if a.dtype.kind == "f" and not np.isfinite(a).all():
                raise ValidationError(
                    f"dense tensor {name!r} contains NaN or Inf; nothing was sent"
                )
        payload = wire.encode_dense(
            dict(state), int(version), run_id=self.run_id, producer_seq=self._next_seq()
        )
        if len(payload) > self.kafka_config.get("message.max.bytes", 1 << 20):
            raise ValidationError(
                f"dense model is {len(payload)} bytes, over message.max.bytes "
                f"{self.kafka_config.get('message.max.bytes')}; raise message.max.bytes on the "
                "producer and the topic, or shrink the model"
            )
        self._produce(dense_topic(self.topic_prefix), 0, payload, rows=0)

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every queued message is acknowledged; raise :class:`PublishError` if any
        failed or is still unacknowledged after ``timeout`` (default: message.timeout.ms + 5 s)."""
        if timeout is None:
            timeout = float(self.kafka_config.get("message.timeout.ms", 30_000)) / 1000 + 5
        remaining = self._producer.flush(timeout)
        with self._lock:
            errors, self._errors = self._errors, []
        if remaining:
            raise PublishError(
                f"{remaining} message(s) still unacknowledged after {timeout:.1f}s; is the broker at "
                f"{self.kafka_config['bootstrap.servers']} reachable?"
            )
        if errors:
            raise PublishError(
                f"{len(errors)} message(s) were not acknowledged by the broker (first: {errors[0]}); "
                "republish them (same version) once the broker is healthy"
            )

    def close(self) -> None:
        """Flush and release the producer. Raises :class:`PublishError` like :meth:`flush`."""
        if self._closed:
            return
        self._closed = True
        self.flush()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self._closed = True
            try:
                self._producer.flush(1.0)
            except Exception:  # noqa: BLE001 - the original exception matters more
                log.exception("flush on error exit failed")

    # ------------------------------------------------------------------ internals

    def _spec(self, table: str) -> TableSpec:
        try:
            return self.tables[table]
        except KeyError:
            raise UnknownTableError(
                f"unknown table {table!r}; this publisher knows {sorted(self.tables)}"
            ) from None

    def _committed_versions(self) -> dict[str, int]:
        if self._committed is None:
            self._committed = read_committed_versions(
                self.kafka_config, self.topic_prefix, self.tables.values(),
                timeout=self.learn_timeout,
            )  # fmt: skip
            self._committed_source = "the commit markers on the stream"
            if self._committed:
                log.info(
                    "learned the committed versions from the stream: %s; publishing continues "
                    "above them", self._committed,
                )  # fmt: skip
                self.stats.committed_version = max(self._committed.values())
        return self._committed

    def _check_above_committed(self, table: str, version: int, *, what: str) -> None:
        committed = self._committed_versions().get(table)
        if committed is not None and version <= committed:
            raise VersionError(
                f"{what}: version {version} of table {table!r} is not newer than the committed "
                f"version {committed} (from {self._committed_source}); every tier would drop these "
                f"rows as older. Continue the numbering above it: a restarted trainer starts at "
                f"pub.committed_version({table!r}) + 1. To start a new numbering on purpose, "
                "pass learn_committed=False (rows below what a tier holds are still dropped)"
            )

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _produce(
        self, topic: str, partition: int, payload: bytes | np.ndarray, *, rows: int
    ) -> None:
        if self._closed:
            raise PublishError("publisher is closed")
        while True:
            try:
                # produce() takes any read-only buffer (a uint8 array too); its stub says bytes.
                self._producer.produce(
                    topic,
                    payload,  # type: ignore[arg-type]
                    partition=partition,
                    on_delivery=self._on_delivery,
                )
                break
            except BufferError:
                self._producer.poll(0.05)  # local queue full: let deliveries drain
        self._producer.poll(0)
        self.stats.messages += 1
        self.stats.rows += rows
        self.stats.bytes += len(payload)

    def _on_delivery(self, err: KafkaError | None, msg: Any) -> None:
        if err is None:
            self.stats.acked += 1
            return
        self.stats.failed += 1
        with self._lock:
            self._errors.append(f"{msg.topic()}[{msg.partition()}]: {err.str()}")


def _check_version_type(version: Any, *, what: str) -> None:
    if isinstance(version, bool) or not isinstance(version, (int, np.integer)):
        raise VersionError(f"{what}: version must be an integer, got {type(version).__name__}")
    if version <= 0:
        raise VersionError(f"{what}: version must be > 0, got {version}")


def _as_keys(keys: Any) -> np.ndarray:
    return as_int64_keys(keys)
