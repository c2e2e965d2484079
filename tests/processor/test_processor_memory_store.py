"""The processor's batch step and the worker's ingest on an in-memory store: no broker, no LMDB.

What the processor writes (rows, markers, offsets) is what the worker's ingest reads back
from the store: the window of rows the worker consumed shrinks to what the store does not hold
yet, and the store's applied versions reach the worker's tracker.
"""

from __future__ import annotations

import numpy as np

from streamhps import wire
from streamhps.cache import make_cache
from streamhps.config import Config, ProcessorSettings, TableSpec
from streamhps.partitioning import partition_of
from streamhps.processor.loop import Processor
from streamhps.store import MemoryStore
from streamhps.testing import FakeConsumer, FakeMessage
from streamhps.worker.ingest import Ingestor, TableState
from streamhps.worker.staleness import LagTracker
from streamhps.worker.window import RecentRows

USER = TableSpec("user", dim=4, partitions=2)
CONFIG = Config(tables=(USER,), topic_prefix="m", processor=ProcessorSettings(kafka_commit=False))
TOPIC = CONFIG.topic("user")


def _keys(partition: int, n: int) -> np.ndarray:
    k = np.arange(500, dtype=np.int64)
    return k[partition_of(k, USER.partitions) == partition][:n]


def _stream() -> list[FakeMessage]:
    k0 = _keys(0, 8)
    v3 = np.full((8, 4), 3.0, np.float32)
    v4 = np.full((4, 4), 4.0, np.float32)
    return [
        FakeMessage(TOPIC, 0, 0, wire.encode_update("user", k0, v3, 3, partition=0)),
        FakeMessage(TOPIC, 0, 1, wire.encode_update("user", k0[:4], v4, 4, partition=0)),
        FakeMessage(TOPIC, 0, 2, wire.encode_marker("user", 4, partition=0, dim=4)),
        FakeMessage(TOPIC, 1, 0, wire.encode_marker("user", 4, partition=1, dim=4)),
    ]


def test_processor_batch_into_memory_store_and_the_worker_follows_it() -> None:
    store = MemoryStore()
    proc = Processor(CONFIG, "unused: the store is given")
    proc.store = store
    store.ensure_tables({"user": USER})
    proc._consumer = FakeConsumer([])  # type: ignore[assignment]
    proc._process(_stream())

    k0 = _keys(0, 8)
    values, versions, found = store.get("user", k0)
    assert found.all() and versions.tolist() == [4] * 4 + [3] * 4
    assert (values[:4] == 4.0).all() and (values[4:] == 3.0).all()
    assert store.offsets() == {(TOPIC, 0): 3, (TOPIC, 1): 1}
    assert store.applied_version("user") == 4
    assert proc.stats.rows_in == 12 and proc.stats.rows_written == 8

    # the worker consumes the same messages, then reads the store's progress
    st = TableState(USER, TOPIC, make_cache("numpy", 64, 4), RecentRows(4, USER.np_dtype, 2))
    tracker = LagTracker({"user": USER.partitions})
    # one message more than the processor wrote: offset 3 of partition 0 (version 5, 2 rows)
    newer = wire.encode_update("user", k0[:2], np.full((2, 4), 5.0, np.float32), 5, partition=0)
    ing = Ingestor(
        FakeConsumer([[*_stream(), FakeMessage(TOPIC, 0, 3, newer)]]), {"user": st}, "m.dense",
        tracker, store,
    )  # fmt: skip
    ing.step()  # applies the messages, then reads the store's offsets and applied versions
    cached, hit = st.cache.lookup(k0)
    assert hit.all() and cached[:2, 0].tolist() == [5.0, 5.0] and (cached[2:4] == 4.0).all()
    # the window keeps what the store does not hold yet (whole chunks: this step's, 8 keys)
    assert st.window.rows == 8
    proc._process([FakeMessage(TOPIC, 0, 3, newer)])  # the processor catches up
    assert store.offsets()[(TOPIC, 0)] == 4
    ing.refresh_store()
    assert st.window.rows == 0
    assert tracker.report()["user"][0]["applied_version"] == 4
