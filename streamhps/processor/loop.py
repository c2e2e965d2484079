"""The processor's consumer loop: table topics -> compacted, versioned rows in LMDB.

One loop, one thread::

    consume up to batch_max_messages (or batch_max_seconds)
    decode + validate each message (streamhps.validation); bad ones -> <topic>.dlq
    (streamhps.deadletters; acknowledged before the commit)
    rows of all good messages -> compacted (highest version per key, never older than LMDB)
    rows + "next offset" of every partition + applied markers -> ONE LMDB write transaction
    (best effort) commit the same offsets to Kafka, for lag tools only

Partitions are assigned statically (``assign``, shard ``i`` of ``n`` takes partitions
``p % n == i`` of every table) and each starts at the offset stored in LMDB, so a crash
anywhere replays only what LMDB does not hold, and versions make any replay harmless.
No consumer-group membership means a restart after ``kill -9`` starts at once: there is no
dead member whose session must time out first.

This loop is the data path and the only code that holds invariants 1, 2, 5, 6 and 7 for LMDB
(docs/INVARIANTS.md); :mod:`.service` runs it inside a faust-streaming worker (process lifecycle, web views, progress
timer) and says, with numbers, why it is not a faust agent.

Broker history lost: the topic's broker id differs from the one stored beside the offsets
(embedded broker restarted, topic recreated; checked at start and every ``history_check_s``),
the stored offset is below the log start (retention passed), or the broker answers "offset
out of range". The processor logs an ERROR saying so, writes the new start offset to LMDB,
continues from the log start, and keeps every LMDB row (versions stop any regression).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicCollection,
    TopicPartition,
)

from streamhps import validation
from streamhps.config import Config, TableSpec, dlq_topic
from streamhps.deadletters import DeadLetterWriter
from streamhps.errors import StreamHPSError
from streamhps.kafka import make_admin, make_consumer, make_producer, max_message_bytes
from streamhps.store import LmdbStore, StoreWriter, WriteBatch
from streamhps.topics import ensure_topics
from streamhps.validation import Rejected, check_table_message

log = logging.getLogger(__name__)


@dataclass
class ProcessorStats:
    """Counters since start (the persisted, cumulative ones are in the store's stats)."""

    messages: int = 0
    rows_in: int = 0
    rows_written: int = 0
    dlq: int = 0
    batches: int = 0
    history_lost: int = 0
    applied: dict[str, int | None] = field(default_factory=dict)


def shard_partitions(spec: TableSpec, shard: tuple[int, int]) -> list[int]:
    """Partitions of ``spec`` that shard ``i`` of ``n`` owns: ``p % n == i``."""
    i, n = shard
    return [p for p in range(spec.partitions) if p % n == i]


class Processor:
    """Consumes the configured table topics into the LMDB store at ``store_dir``.

    ``shard=(i, n)``: this processor owns partitions ``p % n == i`` of every table and
    writes its own store (one LMDB environment per shard). Call :meth:`run` (blocks until
    :meth:`stop`), from any thread.
    """

    def __init__(
        self,
        config: Config,
        store_dir: str,
        *,
        shard: tuple[int, int] = (0, 1),
        on_batch: Callable[[ProcessorStats], None] | None = None,
    ) -> None:
        i, n = shard
        if not (n >= 1 and 0 <= i < n):
            raise StreamHPSError(f"shard must be i/n with 0 <= i < n, got {i}/{n}")
        self.config = config
        self.settings = config.processor
        self.shard = shard
        self.store_dir = store_dir
        self.stats = ProcessorStats()
        self._on_batch = on_batch
        self._stop = threading.Event()
        self._specs = {t.name: t for t in config.tables}
        validation.warm(t.np_dtype for t in config.tables)
        self._topic_table = {config.topic(t.name): t for t in config.tables}
        self._held = {t.name: shard_partitions(t, shard) for t in config.tables}
        self._max_bytes = max_message_bytes(config.kafka)
        self._position: dict[tuple[str, int], int] = {}
        self._known_ids: dict[str, str | None] = {}
        self._warned: dict[str, float] = {}
        self.store: StoreWriter | None = None  # LMDB when run; any store for the batch step
        self._consumer: Consumer | None = None
        self._producer: Producer | None = None
        self._dead_letters: DeadLetterWriter | None = None

    # ------------------------------------------------------------------ lifecycle

    def stop(self) -> None:
        """Ask :meth:`run` to finish the current batch and return (signal-handler safe)."""
        self._stop.set()

    def run(self) -> None:
        s = self.settings
        self.store = LmdbStore.open(
            self.store_dir, readonly=False, map_size=s.map_size_bytes, sync=s.lmdb_sync,
            metasync=s.lmdb_metasync, writemap=s.lmdb_writemap, map_async=s.lmdb_map_async,
        )  # fmt: skip
        try:
            self.store.ensure_tables(self._specs, self._held)
            self._ensure_topics()
            kafka = self.config.kafka
            self._consumer = make_consumer(
                kafka,
                defaults={"group.id": f"{self.config.topic_prefix}.processor"},  # lag tools only
                overrides={
                    "auto.offset.reset": "error",  # out-of-range offsets surface as history lost
                    "enable.partition.eof": False,
                    "on_commit": _on_commit,
                },
            )
            self._admin = make_admin(kafka)
            # idempotent whatever [kafka] says: a retried dead letter must not be duplicated
            self._producer = make_producer(
                kafka, overrides={"enable.idempotence": True, "acks": "all"}
            )
            self._dead_letters = DeadLetterWriter(
                self._producer, on_failure=self._ensure_topics, max_value_bytes=self._max_bytes
            )
            self._assign()
            self._loop()
        finally:
            self._close()

    def _close(self) -> None:
        if self._consumer is not None:
            try:
                self._consumer.close()
            except Exception:  # noqa: BLE001 - closing must not hide the original error
                log.exception("closing the consumer failed")
            self._consumer = None
        if self._producer is not None:
            self._producer.flush(5)
            self._producer = None
        if self.store is not None:
            self.store.close()
            self.store = None
        log.info("processor stopped (store %s)", self.store_dir)

    def _ensure_topics(self) -> None:
        plan: dict[str, int] = {}
        for topic, spec in self._topic_table.items():
            plan[topic] = spec.partitions
            plan[dlq_topic(topic)] = 1
        ensure_topics(self.config.kafka, plan)

    # ------------------------------------------------------------------ assignment

    def _assign(self) -> None:
        assert self.store is not None and self._consumer is not None
        stored = self.store.offsets()
        stored_ids = self.store.topic_ids()
        current_ids = self._topic_ids()
        tps: list[TopicPartition] = []
        fix = WriteBatch(topic_ids={t: i for t, i in current_ids.items() if i})
        for topic, spec in self._topic_table.items():
            recreated = bool(
                stored_ids.get(topic)
                and current_ids.get(topic)
                and stored_ids[topic] != current_ids[topic]
            )
            for p in self._held[spec.name]:
                off = stored.get((topic, p))
                if off is None:
                    tps.append(TopicPartition(topic, p, OFFSET_BEGINNING))
                    continue
                low, high = self._watermarks(topic, p)
                if recreated:
                    self._report_lost(
                        topic,
                        p,
                        off,
                        low,
                        high,
                        f"the topic was recreated (id {stored_ids[topic]} -> {current_ids[topic]})",
                    )
                    off = 0
                    fix.offsets[(topic, p)] = off
                elif low is not None and off < low:
                    self._report_lost(
                        topic, p, off, low, high, "messages before the log start were deleted"
                    )
                    off = low
                    fix.offsets[(topic, p)] = off
                self._position[(topic, p)] = off
                tps.append(TopicPartition(topic, p, off))
        self._known_ids = dict(current_ids)
        if fix:
            self.store.write_batch(fix)
        self._consumer.assign(tps)
        log.info(
            "processor shard %d/%d assigned %s",
            *self.shard,
            ", ".join(
                f"{tp.topic}[{tp.partition}]@{'start' if tp.offset < 0 else tp.offset}"
                for tp in tps
            ),
        )

    def _topic_ids(self) -> dict[str, str | None]:
        """Topic -> broker topic id (None where unknown). A new id means the topic was recreated.

        Topic ids, not watermarks, detect a restarted embedded broker: Tansu reports a high
        watermark below the true log end, and answers a fetch past the end with silence.
        """
        out: dict[str, str | None] = {t: None for t in self._topic_table}
        try:
            futures = self._admin.describe_topics(
                TopicCollection(list(self._topic_table)), request_timeout=5
            )
        except KafkaException as e:
            self._warn_once("describe", f"cannot describe topics: {e}")
            return out
        for topic, fut in futures.items():
            try:
                out[topic] = str(fut.result(timeout=6).topic_id)
            except Exception as e:  # noqa: BLE001 - unknown topic, broker down: check again later
                self._warn_once(
                    f"describe:{topic}",
                    f"cannot describe topic {topic} (broker restarted or topic deleted?): {e}",
                )
        return out

    def _warn_once(self, key: str, text: str) -> None:
        now = time.monotonic()
        if now - self._warned.get(key, -1e9) > 30:
            self._warned[key] = now
            log.warning("%s", text)

    def _watermarks(self, topic: str, p: int, timeout: float = 5.0) -> tuple[Any, Any]:
        assert self._consumer is not None
        try:
            low, high = self._consumer.get_watermark_offsets(
                TopicPartition(topic, p), timeout=timeout, cached=False
            )
            return low, high
        except KafkaException as e:
            self._warn_once(f"wm:{topic}", f"cannot read watermarks of {topic}[{p}]: {e}")
            return None, None

    def _report_lost(self, topic: str, p: int, off: int, low: Any, high: Any, why: str) -> None:
        self.stats.history_lost += 1
        log.error(
            "BROKER HISTORY LOST on %s[%d]: %s (stored/next offset %d, broker watermarks now %s..%s). "
            "The broker was restarted, the topic recreated, or retention passed. Continuing from "
            "the log start; every LMDB row is kept and versions prevent any regression. "
            "Rows published only into the lost range reach LMDB if they are published again.",
            topic, p, why, off, low, high,
        )  # fmt: skip

    def _reposition(self, topic: str, p: int, off: int, topic_id: str | None = None) -> None:
        """Move one partition to ``off`` (after history loss) and record it in LMDB at once."""
        assert self._consumer is not None and self.store is not None
        self._position[(topic, p)] = off
        try:
            self._consumer.seek(TopicPartition(topic, p, off))
        except KafkaException:
            self._consumer.assign([TopicPartition(t, q, o) for (t, q), o in self._position.items()])
        self.store.write_batch(
            WriteBatch(offsets={(topic, p): off}, topic_ids={topic: topic_id} if topic_id else {})
        )

    def _check_history(self) -> None:
        current = self._topic_ids()
        for topic, tid in current.items():
            known = self._known_ids.get(topic)
            if tid is None or tid == known:
                continue
            self._known_ids[topic] = tid
            if known is None:  # first sight (topic created after we started)
                assert self.store is not None
                self.store.write_batch(WriteBatch(topic_ids={topic: tid}))
                continue
            for p in self._held[self._topic_table[topic].name]:
                self._report_lost(topic, p, self._position.get((topic, p), -1), None, None,
                                  f"the topic was recreated (id {known} -> {tid})")  # fmt: skip
                self._reposition(topic, p, 0, tid)

    # ------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        assert self._consumer is not None
        s = self.settings
        next_check = time.monotonic() + s.history_check_s
        while not self._stop.is_set():
            msgs = self._consumer.consume(
                num_messages=s.batch_max_messages, timeout=s.batch_max_seconds
            )
            if msgs:
                self._process(msgs)
            now = time.monotonic()
            if now >= next_check:
                self._check_history()
                next_check = now + s.history_check_s

    def _process(self, msgs: list[Any]) -> None:
        assert self.store is not None and self._consumer is not None
        batch = WriteBatch()
        dlq: list[tuple[Any, Rejected]] = []
        for m in msgs:
            err = m.error()
            if err is not None:
                self._on_error(m, err)
                continue
            topic, p, off = m.topic(), m.partition(), m.offset()
            spec = self._topic_table.get(topic)
            if spec is None:
                continue
            batch.offsets[(topic, p)] = off + 1
            self._position[(topic, p)] = off + 1
            msg = check_table_message(m.value(), spec, p, self._specs, self._max_bytes)
            if isinstance(msg, Rejected):
                dlq.append((m, msg))
                batch.dlq[spec.name] = batch.dlq.get(spec.name, 0) + 1
                continue
            batch.messages[spec.name] = batch.messages.get(spec.name, 0) + 1
            if msg.is_marker:
                key = (spec.name, p)
                batch.applied[key] = max(batch.applied.get(key, 0), msg.version)
            elif msg.row_count:
                batch.table_rows(spec.name).add(msg.keys, msg.vectors, msg.versions())
        if dlq:
            assert self._dead_letters is not None
            self._dead_letters.send(dlq)  # acknowledged before the offsets past them commit
        if not batch:
            return
        results = self.store.write_batch(batch)
        self.stats.batches += 1
        self.stats.messages += sum(batch.messages.values())
        self.stats.dlq += len(dlq)
        for r in results.values():
            self.stats.rows_in += r.rows_in
            self.stats.rows_written += r.rows_written
        if batch.applied:
            for table in {t for t, _ in batch.applied}:
                self.stats.applied[table] = self.store.applied_version(table)
        if self.settings.kafka_commit:
            try:
                self._consumer.commit(
                    offsets=[TopicPartition(t, p, o) for (t, p), o in batch.offsets.items()],
                    asynchronous=True,
                )
            except KafkaException as e:  # lag visibility only: LMDB holds the truth
                log.debug("Kafka offset commit failed: %s", e)
        if self._on_batch is not None:
            self._on_batch(self.stats)

    def _on_error(self, m: Any, err: KafkaError) -> None:
        code = err.code()
        if code == KafkaError._PARTITION_EOF:
            return
        topic, p = m.topic(), m.partition()
        if (
            code in (KafkaError._AUTO_OFFSET_RESET, KafkaError.OFFSET_OUT_OF_RANGE)
            and topic is not None
        ):
            low, high = self._watermarks(topic, p)
            pos = self._position.get((topic, p), -1)
            self._report_lost(
                topic,
                p,
                pos,
                low,
                high,
                f"the broker says the offset is out of range ({err.str()})",
            )
            self._reposition(topic, p, low if low is not None else 0)
            return
        if code in (
            KafkaError.UNKNOWN_TOPIC_OR_PART,
            KafkaError._UNKNOWN_TOPIC,
            KafkaError._UNKNOWN_PARTITION,
        ):
            log.warning(
                "%s[%s] is unknown to the broker (restarted or topic deleted?): %s",
                topic,
                p,
                err.str(),
            )
            return
        log.warning("consumer error on %s[%s]: %s", topic, p, err.str())


def _on_commit(err: KafkaError | None, partitions: list[TopicPartition]) -> None:
    if err is not None:
        log.debug("Kafka offset commit (lag visibility only) failed: %s", err)
