"""The worker's ingest logic on fake messages: no broker, no LMDB."""

from __future__ import annotations

from typing import Any

import numpy as np

from streamhps import wire
from streamhps.cache import make_cache
from streamhps.config import TableSpec
from streamhps.partitioning import partition_of
from streamhps.store import MemoryStore
from streamhps.testing import FakeConsumer, FakeMessage
from streamhps.worker.ingest import FETCH_BITE_BYTES, Ingestor, TableState
from streamhps.worker.staleness import LagTracker
from streamhps.worker.window import RecentRows

SPEC = TableSpec(name="user", dim=4, partitions=4)
TOPIC = "t.user"


def _ingestor(msgs: list[Any]) -> tuple[Ingestor, TableState]:
    st = TableState(
        SPEC,
        TOPIC,
        make_cache("numpy", capacity=1024, dim=SPEC.dim),
        RecentRows(SPEC.dim, SPEC.np_dtype, SPEC.partitions),
    )
    ing = Ingestor(
        FakeConsumer([msgs]), {SPEC.name: st}, "t.dense", LagTracker({SPEC.name: 4}),
        MemoryStore(),
    )  # fmt: skip
    return ing, st


def _keys_of(partition: int, n: int = 16) -> np.ndarray:
    k = np.arange(10_000, dtype=np.int64)
    return k[partition_of(k, SPEC.partitions) == partition][:n]


def test_worker_does_not_apply_rows_of_another_partition() -> None:
    """Rows that belong to partition 1, in a message on Kafka partition 0 (whether the envelope
    says 1 or lies and says 0), never reach the cache or the window: the processor refuses the
    same message (wrong_partition), so LMDB never holds those rows."""
    keys = _keys_of(1)
    vec = np.ones((keys.shape[0], SPEC.dim), np.float32)
    honest = wire.encode_update("user", keys, vec, 5, partition=1)
    lying = wire.encode_update("user", keys, vec, 6, partition=0)
    good_keys = _keys_of(0)
    good = wire.encode_update(
        "user", good_keys, np.ones((good_keys.shape[0], SPEC.dim), np.float32), 7, partition=0
    )
    ing, st = _ingestor(
        [FakeMessage(TOPIC, 0, 0, honest), FakeMessage(TOPIC, 0, 1, lying),
         FakeMessage(TOPIC, 0, 2, good)]
    )  # fmt: skip
    ing.step()
    _, hit = st.cache.lookup(keys)
    assert not hit.any(), "rows of partition 1 consumed from partition 0 were applied"
    _, _, in_window = st.window.get(keys)
    assert not in_window.any()
    _, good_hit = st.cache.lookup(good_keys)
    assert good_hit.all()
    assert ing.counters.rows == good_keys.shape[0]
    assert ing.rejections()["recent"] == [
        [TOPIC, 0, 0, "wrong_partition"], [TOPIC, 0, 1, "wrong_partition"]
    ]  # fmt: skip


class _FetchingConsumer(FakeConsumer):
    """Its cached high watermark is what the fetch that delivered each message said."""

    def __init__(self, batches: list[list[Any]]) -> None:
        super().__init__(batches)
        self.hw: dict[int, int] = {}

    def consume(self, num_messages: int, timeout: float) -> list[Any]:
        batch = super().consume(num_messages, timeout)
        for m in batch:
            self.hw[m.partition()] = max(self.hw.get(m.partition(), -1001), m.offset() + 1)
        return batch

    def get_watermark_offsets(self, tp: Any, cached: bool = False) -> tuple[int, int]:
        return (0, self.hw.get(tp.partition, -1001))


def test_the_fetched_watermark_never_lags_the_position() -> None:
    """The head probe takes the larger of the broker's ListOffsets answer (low on the embedded
    broker) and the watermark the ingest thread handed over, and reports the broker's history
    lost when that is below the worker's position. A watermark read every 50 ms lagged the
    position it came with: 'history lost' on a healthy broker (seen in bench/staleness.py)."""
    keys = _keys_of(0)
    vec = np.ones((keys.shape[0], SPEC.dim), np.float32)
    msgs = [
        FakeMessage(TOPIC, 0, off, wire.encode_update("user", keys, vec, off + 1, partition=0))
        for off in range(3)
    ]
    st = TableState(
        SPEC, TOPIC, make_cache("numpy", capacity=1024, dim=SPEC.dim),
        RecentRows(SPEC.dim, SPEC.np_dtype, SPEC.partitions),
    )  # fmt: skip
    tracker = LagTracker({SPEC.name: 4})
    # no periodic watermark read in this step: only what comes with the messages
    ing = Ingestor(
        _FetchingConsumer([msgs]), {SPEC.name: st}, "t.dense", tracker, MemoryStore(),
        store_refresh_s=1e9,
    )  # fmt: skip
    ing.step()
    assert tracker.position(SPEC.name)[0] == 3
    assert tracker.fetched_high_watermarks(SPEC.name)[0] >= 3


def test_large_messages_are_consumed_in_bites_of_about_a_megabyte() -> None:
    """``consume`` copies every payload it returns while holding the GIL (~0.1 ms per MB), so
    a request thread waited behind a call returning tens of MB. Once the worker has seen how
    large messages are, it asks for about FETCH_BITE_BYTES per call, and still applies all that
    is there in one round."""
    keys = _keys_of(0, 400)
    vec = np.ones((keys.shape[0], 256), np.float32)  # ~0.4 MB per message
    spec = TableSpec(name="user", dim=256, partitions=4)

    def msg(off: int) -> FakeMessage:
        return FakeMessage(
            TOPIC, 0, off, wire.encode_update("user", keys, vec, off + 1, partition=0)
        )

    st = TableState(
        spec, TOPIC, make_cache("numpy", capacity=4096, dim=256),
        RecentRows(256, spec.np_dtype, spec.partitions),
    )  # fmt: skip
    consumer = FakeConsumer([[msg(0)], [msg(o) for o in range(1, 11)]])
    ing = Ingestor(consumer, {"user": st}, "t.dense", LagTracker({"user": 4}), MemoryStore())
    assert ing.step() == 1  # learns the size
    per_call = FETCH_BITE_BYTES // len(msg(0).value())
    assert per_call == 2
    consumer.calls.clear()
    assert ing.step() == 10  # everything that was there, in one apply
    assert max(consumer.calls) == per_call, consumer.calls
    assert st.cache.get_versions(keys)[0].min() == 11


def test_window_merges_wait_until_the_rows_are_visible_and_no_batch_waits() -> None:
    """The window's merges of small batches were most of the window's share of consumed ->
    visible: the apply thread inserts each batch's chunk unmerged, makes the rows visible, and
    merges afterwards, when no batch waits, or once MERGE_EVERY_CHUNKS chunks are pending while
    batches keep coming (the chunks a miss searches stay bounded)."""
    from streamhps.worker.ingest import MERGE_EVERY_CHUNKS, ConsumedBatch

    keys = _keys_of(0, 64)
    vec = np.ones((keys.shape[0], SPEC.dim), np.float32)
    msgs = [
        [FakeMessage(TOPIC, 0, off, wire.encode_update("user", keys, vec, off + 1, partition=0))]
        for off in range(MERGE_EVERY_CHUNKS + 2)
    ]
    ing, st = _ingestor([])
    ing.consumer = FakeConsumer(msgs)
    ing._batches.put(ConsumedBatch())  # a batch waits: merges are put off
    for i in range(MERGE_EVERY_CHUNKS - 1):
        batch = ing._fetch()
        assert batch is not None
        ing._apply_batch(batch)
        ing._merge_windows(force=False)
        assert st.window.pending == i + 1  # visible, not merged
        _, ver, found = st.window.get(keys)
        assert found.all() and (ver == i + 1).all()
        _, hit = st.cache.lookup(keys)
        assert hit.all()
    batch = ing._fetch()
    assert batch is not None
    ing._apply_batch(batch)
    ing._merge_windows(force=False)  # the MERGE_EVERY_CHUNKS-th pending chunk: merged now
    assert st.window.merged and st.window.chunks == 1
    ing._batches.get_nowait()  # nothing waits any more: the next batch's chunk merges at once
    batch = ing._fetch()
    assert batch is not None
    ing._apply_batch(batch)
    ing._merge_windows(force=False)
    assert st.window.merged
    assert ing.profile.seconds["window_merge"] > 0
