"""The worker's ingest loop: consume, decode, validate, apply whole batches to cache and window.

Two threads: the fetch thread owns the consumer (consume, decode, validate, the fetched
watermarks) and hands each decoded batch to the apply thread, which writes window and cache
and moves the positions; so the next batch is fetched and decoded while one is applied.

Validation is :mod:`streamhps.validation`'s, the processor's own: a message the processor
dead-letters is skipped here for the same reason and counted (``rejected``); workers write no
dead letters (the processor's one copy per bad message is the record).

The apply thread owns the windows and every cache write (stream updates and the read-through
fills that lookups request), so cache writes are serialised with the stream and a fill can be
checked against the window at the moment it is applied (invariant 3).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from streamhps import validation
from streamhps.cache.base import EmbeddingCache
from streamhps.config import TableSpec
from streamhps.store.base import StoreReader
from streamhps.validation import Rejected, check_dense_message, check_table_message
from streamhps.worker.staleness import LagTracker
from streamhps.worker.window import RecentRows, latest_rows

log = logging.getLogger(__name__)

_LATENCY_SAMPLES = 1 << 16
#: One round (:func:`consume_batch`) takes up to this many messages, waiting at most this long
#: when none are there. A batch is applied as one unit (rows of all its messages of a table in
#: one window insert and one cache write), so a worker that falls behind catches up in larger,
#: cheaper applies.
BATCH_MESSAGES = 1024
POLL_TIMEOUT_S = 0.005
#: Payload bytes one ``consume`` call may return (:func:`consume_batch`'s ``bite``, from the
#: recent mean message size): the call holds the GIL while it copies them, ~0.1 ms per MB.
FETCH_BITE_BYTES = 1 << 20
#: Stages of the ingest threads' time (:meth:`Ingestor.profile`). The fetch thread:
#: ``poll_idle``: consume calls that returned nothing (waiting for data); ``poll``: those that
#: returned messages; ``decode_validate``: wire decode and checks of every message. The apply
#: thread: ``apply_idle``: waiting for a consumed batch; ``dedup_sort``: one row per key (a host
#: sort of the batch's keys; for a cache that does not resolve repeated keys itself, the gather
#: of the kept rows); ``window``: the window insert; ``window_merge``: the window's merges of
#: the chunks inserted since the last ones, after the rows became visible (one at a time while
#: no batch waits, all at once every ``MERGE_EVERY_CHUNKS``); ``cache``: the cache write
#: (numpy: one compiled call holding the table's gate piece by piece; cuda: staging, host ->
#: device copy and kernels enqueued); ``markers``: commit markers, positions and latency
#: records; ``fills``: read-through fills;
#: ``store_refresh``: the store's offsets and window pruning. Each thread's stages add up to
#: the wall time.
STAGES = ("poll_idle", "poll", "decode_validate", "apply_idle", "dedup_sort", "window",
          "window_merge", "cache", "markers", "fills", "store_refresh")  # fmt: skip
#: window chunks inserted unmerged after which the ingest thread merges them even while
#: batches wait (bounds the chunks a miss searches, and the merge work left for one round)
MERGE_EVERY_CHUNKS = 8
#: consumed batches the fetch thread may hold ready while the apply thread is busy
QUEUED_BATCHES = 2
DenseCallback = Callable[[int, dict[str, np.ndarray]], None]


@dataclass
class TableState:
    """Everything the worker keeps for one table."""

    spec: TableSpec
    topic: str
    cache: EmbeddingCache
    window: RecentRows
    rows: int = 0  # rows applied from the stream
    messages: int = 0


@dataclass
class Fill:
    """Rows a lookup read from the window/LMDB, to insert into the cache on the ingest thread."""

    table: str
    keys: np.ndarray
    vectors: np.ndarray
    versions: np.ndarray
    epoch: int  # the window's epoch before the lookup read it


@dataclass
class IngestCounters:
    messages: int = 0
    rows: int = 0
    markers: int = 0
    bytes: int = 0
    batches: int = 0
    kafka_errors: int = 0
    fills_applied: int = 0
    fills_dropped: int = 0
    dense_updates: int = 0
    started_at: float = field(default_factory=time.monotonic)


Parts = list[tuple[np.ndarray, np.ndarray, np.ndarray, int, int]]
"""Rows of one table from a batch's messages: (keys, versions, vectors, partition, offset)."""


@dataclass
class ConsumedBatch:
    """One consume round, decoded and checked: what the fetch thread hands the apply thread."""

    messages: int = 0
    rows: dict[str, Parts] = field(default_factory=dict)  # table -> its messages' rows
    markers: list[tuple[str, int, int]] = field(default_factory=list)  # (table, part, version)
    positions: dict[tuple[str, int], int] = field(default_factory=dict)  # next offset
    # per message of rows: (publish time us, rows, wall time the consumer returned it)
    published: list[tuple[int, int, float]] = field(default_factory=list)

    def extend(self, later: ConsumedBatch) -> None:
        """Append a later round (applied as one: the same result, one window insert and one
        cache write per table)."""
        self.messages += later.messages
        for name, parts in later.rows.items():
            self.rows.setdefault(name, []).extend(parts)
        self.markers.extend(later.markers)
        self.positions.update(later.positions)
        self.published.extend(later.published)


def consume_batch(
    consumer: Any, max_messages: int, timeout: float, bite: int | None = None
) -> list[Any]:
    """Up to ``max_messages`` messages, without waiting for more once some are there.

    ``consume(n, timeout)`` returns only when it has ``n`` messages or the timeout passed, so a
    single call adds up to ``timeout`` to every message of a batch smaller than ``n``. Instead:
    take what the consumer already fetched; if nothing, wait up to ``timeout`` for the first
    message, then take what arrived with it.

    ``bite``: messages per ``consume`` call (default: all at once). A call copies every payload
    it returns into Python bytes while holding the GIL (about 0.1 ms per MB), so a worker takes
    large messages in bites: request threads get the interpreter between them.
    """
    step = max(1, min(bite or max_messages, max_messages))
    msgs: list[Any] = consumer.consume(num_messages=step, timeout=0)
    full = len(msgs) == step  # a short answer: nothing more is fetched yet
    if not msgs:
        msgs = consumer.consume(num_messages=1, timeout=timeout)
        full = bool(msgs)  # then take what arrived with it
    while full and len(msgs) < max_messages:
        want = min(step, max_messages - len(msgs))
        more = consumer.consume(num_messages=want, timeout=0)
        msgs += more
        full = len(more) == want
    return msgs


def row_quantiles(seconds: np.ndarray, rows: np.ndarray, qs: tuple[float, ...]) -> list[float]:
    """Quantiles of publish -> visible over *rows*: a message's time counts once per row."""
    if seconds.size == 0:
        return [float("nan")] * len(qs)
    o = np.argsort(seconds)
    cw = np.cumsum(rows[o], dtype=np.float64)
    idx = np.minimum(np.searchsorted(cw, np.asarray(qs) * cw[-1]), seconds.size - 1)
    return [float(v) for v in seconds[o][idx]]


class StageTimes:
    """Seconds the ingest thread spent per stage (``STAGES``) since the last reset: a
    ``perf_counter`` pair per stage per consume round, cheap enough to stay on."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self.longest = dict.fromkeys(STAGES, 0.0)  # the longest single pass through each stage
        self.rows = 0
        self.applies = 0
        self.t0 = time.perf_counter()

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] += seconds
        if seconds > self.longest[stage]:
            self.longest[stage] = seconds

    def snapshot(self) -> dict[str, Any]:
        return {
            "stages": dict(self.seconds), "longest": dict(self.longest),
            "wall_s": time.perf_counter() - self.t0, "rows": self.rows, "batches": self.applies,
        }  # fmt: skip


class Ingestor:
    """Consumes every assigned partition on a background thread and applies what it reads."""

    def __init__(
        self,
        consumer: Any,
        tables: dict[str, TableState],
        dense_topic: str,
        tracker: LagTracker,
        store: StoreReader,
        *,
        batch_messages: int = BATCH_MESSAGES,
        poll_timeout_s: float = POLL_TIMEOUT_S,
        store_refresh_s: float = 0.05,
        max_message_bytes: int | None = None,
    ) -> None:
        self.consumer = consumer
        validation.warm(st.spec.np_dtype for st in tables.values())
        self.max_message_bytes = max_message_bytes  # larger messages are refused (oversized)
        self.tables = tables
        self._by_topic = {st.topic: st for st in tables.values()}
        self.dense_topic = dense_topic
        self.tracker = tracker
        # messages skipped, by validation.Reason (the processor dead-letters them)
        self.rejected: Counter[str] = Counter()
        self.recent_rejections: deque[tuple[str, int, int, str]] = deque(maxlen=64)
        self._rejected_lock = threading.Lock()
        self.store = store
        self.batch_messages = batch_messages
        self._bite = batch_messages  # messages per consume call: FETCH_BITE_BYTES of payload
        self.poll_timeout_s = poll_timeout_s
        self.store_refresh_s = store_refresh_s
        self.counters = IngestCounters()
        self.fills: queue.SimpleQueue[Fill] = queue.SimpleQueue()
        self._batches: queue.Queue[ConsumedBatch] = queue.Queue(maxsize=QUEUED_BATCHES)
        self.dense: tuple[int, dict[str, np.ndarray]] | None = None
        self.dense_callbacks: list[DenseCallback] = []
        # entered on the ingest thread: the worker's GPU as its current device (cuda:N)
        self.context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_store_refresh = 0.0
        self._last_watermarks = 0.0
        self._lat = np.zeros(_LATENCY_SAMPLES)
        self._lat_rows = np.zeros(_LATENCY_SAMPLES, dtype=np.int64)
        self._lat_consumed = np.zeros(_LATENCY_SAMPLES)  # publish -> returned by consume()
        self._lat_n = 0
        self.profile = StageTimes()
        self._lat_lock = threading.Lock()
        self._last_error_log = 0.0

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="streamhps-ingest", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        """The apply thread (this one) and the fetch thread it starts: while this thread applies
        a batch, the fetch thread consumes and decodes the next (handed over through a queue of
        ``QUEUED_BATCHES``; batches that queued up while an apply ran are applied as one)."""
        fetcher = threading.Thread(target=self._fetch_loop, name="streamhps-fetch", daemon=True)
        try:
            with self.context():
                self.refresh_store()
                fetcher.start()
                while not self._stop.is_set():
                    self._apply_round()
        except BaseException as e:  # noqa: BLE001 - reported through ready()/not_ready_reason()
            self.error = e
            log.exception("worker ingest thread failed; the worker is not ready from now on")
        finally:
            self._stop.set()
            if fetcher.is_alive():
                fetcher.join(10.0)

    def _fetch_loop(self) -> None:
        try:
            with self.context():
                while not self._stop.is_set():
                    batch = self._fetch()
                    while batch is not None and not self._stop.is_set():
                        try:
                            self._batches.put(batch, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    now = time.monotonic()
                    if now - self._last_watermarks >= self.store_refresh_s:
                        self._read_watermarks(now)
        except BaseException as e:  # noqa: BLE001 - reported through ready()/not_ready_reason()
            self.error = e
            self._stop.set()
            log.exception("worker fetch thread failed; the worker is not ready from now on")

    def _apply_round(self) -> None:
        t0 = time.perf_counter()
        try:
            batch: ConsumedBatch | None = self._batches.get(timeout=self.poll_timeout_s)
        except queue.Empty:
            batch = None
        self.profile.add("apply_idle", time.perf_counter() - t0)
        if batch is not None:
            for _ in range(self._batches.qsize()):  # behind: catch up in one larger apply
                with contextlib.suppress(queue.Empty):
                    batch.extend(self._batches.get_nowait())
            self._apply_batch(batch)
        self._merge_windows(force=False)  # idle too: merges a burst's last batch left
        self._after_apply()

    def step(self) -> int:
        """One consume-and-apply round on the calling thread; returns messages consumed."""
        batch = self._fetch()
        if batch is not None:
            self._apply_batch(batch)
            self._merge_windows(force=True)
        now = time.monotonic()
        if now - self._last_watermarks >= self.store_refresh_s:
            self._read_watermarks(now)
        self._after_apply()
        return batch.messages if batch is not None else 0

    def _merge_windows(self, force: bool) -> None:
        """The window merges of the rows just made visible: all of them if ``force`` or once a
        window holds ``MERGE_EVERY_CHUNKS`` unmerged chunks; else one merge at a time while no
        batch waits (a batch that comes waits for one merge, not for a cascade of them)."""
        windows = [st.window for st in self.tables.values() if not st.window.merged]
        if not windows:
            return
        t0 = time.perf_counter()
        if force or any(w.pending >= MERGE_EVERY_CHUNKS for w in windows):
            for w in windows:
                w.compact()
        else:
            while windows and self._batches.empty():
                windows = [w for w in windows if not w.compact(merges=1)]
        self.profile.add("window_merge", time.perf_counter() - t0)

    def _after_apply(self) -> None:
        """Read-through fills, then (every ``store_refresh_s``) the store's progress."""
        t1 = time.perf_counter()
        self._apply_fills()
        t2 = time.perf_counter()
        self.profile.add("fills", t2 - t1)
        if time.monotonic() - self._last_store_refresh >= self.store_refresh_s:
            self.refresh_store()
        self.profile.add("store_refresh", time.perf_counter() - t2)

    def _read_watermarks(self, now: float) -> None:
        """Hand the consumer's cached high watermarks (from its last fetches) to the tracker.

        Only this thread calls the consumer: from the probe thread the same call waited behind
        ``consume`` for tens of seconds."""
        self._last_watermarks = now
        for st in self.tables.values():
            for p in self.tracker.owned_partitions(st.spec.name):
                self._read_watermark(st, p)

    def _read_watermark(self, st: TableState, partition: int) -> None:
        try:
            hw = self.consumer.get_watermark_offsets(
                TopicPartition(st.topic, partition), cached=True
            )[1]
        except (KafkaException, RuntimeError):
            return
        if hw >= 0:
            self.tracker.fetched(st.spec.name, partition, int(hw))

    # ---------------------------------------------------------------- the store's progress

    def refresh_store(self) -> None:
        """Read the store's offsets (and applied versions); drop window rows the store holds."""
        self._last_store_refresh = time.monotonic()
        offsets = self.store.offsets()
        for st in self.tables.values():
            nxt = np.zeros(st.spec.partitions, dtype=np.int64)
            for p in range(st.spec.partitions):
                nxt[p] = offsets.get((st.topic, p), 0)
            st.window.prune(nxt)
            with contextlib.suppress(KeyError):  # table not in the store yet (UnknownTableError)
                applied = self.store.partition_applied_versions(st.spec.name)
                self.tracker.store_applied(st.spec.name, applied)

    # ---------------------------------------------------------------- applying messages

    def _fetch(self) -> ConsumedBatch | None:
        """One consume round, decoded and checked (fetch side; the only caller of the
        consumer once the worker runs); None when nothing came."""
        t0 = time.perf_counter()
        try:
            msgs = consume_batch(
                self.consumer, self.batch_messages, self.poll_timeout_s, self._bite
            )
        except KafkaException as e:
            self._kafka_error(e.args[0] if e.args else e)
            msgs = []
        t1 = time.perf_counter()
        self.profile.add("poll" if msgs else "poll_idle", t1 - t0)
        if not msgs:
            return None
        batch = ConsumedBatch(messages=len(msgs))
        consumed_at = time.time()
        c = self.counters
        bytes_before = c.bytes
        for m in msgs:
            err = m.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    self._kafka_error(err)
                continue
            topic = m.topic()
            st = self._by_topic.get(topic)
            if st is None:
                if topic == self.dense_topic:
                    self._dense(m)
                continue
            part, off = m.partition(), m.offset()
            batch.positions[(st.spec.name, part)] = off + 1
            value = m.value()
            c.messages += 1
            st.messages += 1
            c.bytes += len(value) if value is not None else 0
            dec = check_table_message(value, st.spec, part, self.tables, self.max_message_bytes)
            if isinstance(dec, Rejected):
                self._reject(m, dec)
                continue
            if dec.is_marker:
                batch.markers.append((st.spec.name, part, dec.version))
            elif dec.row_count:
                batch.published.append((dec.publish_ts_us, dec.row_count, consumed_at))
                batch.rows.setdefault(st.spec.name, []).append(
                    (dec.keys, dec.versions(), dec.vectors, part, off)
                )
        # The watermark of the fetch that delivered these messages, read before their positions
        # can move: the head probe never sees a position beyond the fetched watermark (which it
        # would report as broker history lost).
        for name, part in batch.positions:
            self._read_watermark(self.tables[name], part)
        mean = (c.bytes - bytes_before) / len(msgs)
        self._bite = max(1, min(self.batch_messages, int(FETCH_BITE_BYTES // max(mean, 1.0))))
        self.profile.add("decode_validate", time.perf_counter() - t1)
        return batch

    def _apply_batch(self, batch: ConsumedBatch) -> None:
        """Rows to window and cache, then markers and positions (apply side)."""
        for name, parts in batch.rows.items():
            self._apply_rows(self.tables[name], parts)
        t0 = time.perf_counter()
        c = self.counters
        for name, part, version in batch.markers:
            self.tracker.marker(name, part, version)
            c.markers += 1
        for (name, part), nxt in batch.positions.items():
            self.tracker.consumed(name, part, nxt)
        c.batches += 1
        if batch.published:
            # Stamped after the cache write returned: from here on a lookup sees these rows.
            pub = np.asarray(batch.published, dtype=np.float64)
            published = pub[:, 0] / 1e6
            self._record_latency(
                time.time() - published, pub[:, 1].astype(np.int64), pub[:, 2] - published
            )
        self.profile.add("markers", time.perf_counter() - t0)

    def _apply_rows(self, st: TableState, parts: Parts) -> None:
        """One window insert and one cache write for the rows of all ``parts`` (messages) of a
        table. Vectors are not copied on the host: the window keeps the decoded messages'
        arrays, and a cache that resolves repeated keys itself (cuda) takes them as they are."""
        t0 = time.perf_counter()
        sources = [p[2] for p in parts]
        if len(parts) == 1:
            keys, versions, _, part, off = parts[0]
            n = keys.shape[0]
            partitions = np.full(n, part, dtype=np.int32)
            offsets = np.full(n, off, dtype=np.int64)
            src = np.zeros(n, dtype=np.int32)
            row = np.arange(n, dtype=np.int64)
        else:
            keys = np.concatenate([p[0] for p in parts])
            versions = np.concatenate([p[1] for p in parts])
            counts = np.array([p[0].shape[0] for p in parts], dtype=np.int64)
            partitions = np.repeat(np.array([p[3] for p in parts], dtype=np.int32), counts)
            offsets = np.repeat(np.array([p[4] for p in parts], dtype=np.int64), counts)
            src = np.repeat(np.arange(len(parts), dtype=np.int32), counts)
            row = np.arange(keys.shape[0], dtype=np.int64) - np.repeat(
                np.cumsum(counts) - counts, counts
            )
        n = int(keys.shape[0])
        sel = latest_rows(keys, versions)
        uk, uv = keys[sel], versions[sel]
        if st.cache.resolves_duplicates or sel.shape[0] == n:
            # no repeated key (or a cache that resolves them): the messages' rows as they are,
            # in arrival order; the numpy cache writes each piece straight from them
            rows: tuple[Any, Any, Any] = (keys, sources, versions)
        else:
            stacked = sources[0] if len(sources) == 1 else np.concatenate(sources)
            rows = (uk, np.take(stacked, sel, axis=0), uv)
        t1 = time.perf_counter()
        # Window before cache: a lookup that misses the cache after this point finds the row
        # here, and a fill applied later on this thread is checked against it.
        st.window.add(
            uk, uv, sources, partitions[sel], offsets[sel], src=src[sel], row=row[sel],
            compact=False,
        )  # fmt: skip
        t2 = time.perf_counter()
        # No count back: the cuda cache enqueues without waiting for the device (later lookups
        # are ordered after it on its stream); the numpy cache writes the batch in one compiled
        # call, a lookup waiting at most for one piece of it.
        st.cache.upsert_async(*rows, insert=st.spec.insert_on_update)
        t3 = time.perf_counter()
        self.profile.add("dedup_sort", t1 - t0)
        self.profile.add("window", t2 - t1)
        self.profile.add("cache", t3 - t2)
        self.profile.rows += n
        self.profile.applies += 1
        st.rows += n
        self.counters.rows += n

    def _apply_fills(self) -> None:
        while True:
            try:
                f = self.fills.get_nowait()
            except queue.Empty:
                return
            st = self.tables[f.table]
            if st.window.epoch != f.epoch:
                # Rows left the window since the lookup read it: what it read from LMDB may be
                # older than a row that went from the window to LMDB meanwhile. The next miss
                # reads again.
                self.counters.fills_dropped += 1
                continue
            wv, wver, found = st.window.get(f.keys)
            newer = found & (wver > f.versions)
            if newer.any():
                f.vectors[newer] = wv[newer]
                f.versions[newer] = wver[newer]
            # As the stream's rows (keys of a fill are distinct): the numpy cache enters its gate
            # inside the compiled write, so a lookup never waits for this thread to get the GIL
            # back (``upsert`` holds the gate from Python: with the ingest in its own process
            # that made the serving process's lookups wait for the child's GIL hand-overs)
            st.cache.upsert_async(f.keys, f.vectors, f.versions, insert=True)
            self.counters.fills_applied += 1

    def _reject(self, m: Any, rejected: Rejected) -> None:
        """Skip a message the processor dead-letters (for the same reason); count it."""
        with self._rejected_lock:
            self.rejected[str(rejected.reason)] += 1
            self.recent_rejections.append(
                (m.topic(), m.partition(), m.offset(), str(rejected.reason))
            )
        log.warning(
            "skipped %s[%d]@%d (%s): %s",
            m.topic(), m.partition(), m.offset(), rejected.reason, rejected.detail,
        )  # fmt: skip

    def rejections(self) -> dict[str, Any]:
        """Messages skipped: ``count``, ``by_reason`` and the ``recent`` ones (topic, partition,
        offset, reason), newest last."""
        with self._rejected_lock:
            return {
                "count": sum(self.rejected.values()),
                "by_reason": dict(self.rejected),
                "recent": [list(r) for r in self.recent_rejections],
            }

    def _dense(self, m: Any) -> None:
        dec = check_dense_message(m.value())
        if isinstance(dec, Rejected):
            self._reject(m, dec)
            return
        if self.dense is not None and dec.version <= self.dense[0]:
            return
        self.dense = (dec.version, dec.tensors)
        self.counters.dense_updates += 1
        log.info("dense model version %d received (%d tensors)", dec.version, len(dec.tensors))
        for cb in list(self.dense_callbacks):
            try:
                cb(dec.version, dec.tensors)
            except Exception:  # noqa: BLE001 - a bad callback must not stop ingestion
                log.exception("dense-model callback %r failed", cb)

    def _kafka_error(self, err: Any) -> None:
        self.counters.kafka_errors += 1
        now = time.monotonic()
        if now - self._last_error_log > 5.0:
            self._last_error_log = now
            log.warning("worker consumer error: %s", err)

    # ---------------------------------------------------------------- latency samples

    def _record_latency(self, seconds: np.ndarray, rows: np.ndarray, consumed: np.ndarray) -> None:
        with self._lat_lock:
            n = seconds.shape[0]
            idx = (self._lat_n + np.arange(n)) % _LATENCY_SAMPLES
            self._lat[idx] = seconds
            self._lat_rows[idx] = rows
            self._lat_consumed[idx] = consumed
            self._lat_n += n

    def latencies_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """``(seconds, rows)`` of the last (up to 65536) messages of rows: each message's
        publish -> visible time and how many rows it carried (weights for per-row quantiles)."""
        with self._lat_lock:
            k = min(self._lat_n, _LATENCY_SAMPLES)
            return self._lat[:k].copy(), self._lat_rows[:k].copy()

    def latency_split(self) -> dict[str, float]:
        """Where publish -> visible goes, per row over the recorded messages (ms): up to the
        consumer returning the message (``consumed``: broker, fetch, the consumer's queue while
        this thread was busy) and from there to visible (``apply``: the rest of the round)."""
        with self._lat_lock:
            k = min(self._lat_n, _LATENCY_SAMPLES)
            vis, rows, cons = self._lat[:k], self._lat_rows[:k], self._lat_consumed[:k]
            out: dict[str, float] = {}
            for name, x in (("consumed", cons), ("apply", vis - cons), ("visible", vis)):
                p50, p99, top = row_quantiles(x * 1e3, rows, (0.5, 0.99, 1.0))
                out.update({f"{name}_p50_ms": p50, f"{name}_p99_ms": p99, f"{name}_max_ms": top})
            return out

    def reset_latencies(self) -> None:
        with self._lat_lock:
            self._lat_n = 0
