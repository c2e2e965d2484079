"""One validation path: every reason, and the processor and the worker agreeing on each message."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from streamhps import wire
from streamhps.cache import make_cache
from streamhps.config import Config, ProcessorSettings, TableSpec
from streamhps.deadletters import DeadLetterWriter
from streamhps.partitioning import partition_of
from streamhps.processor.loop import Processor
from streamhps.store import LmdbStore, MemoryStore
from streamhps.testing import FakeConsumer, FakeMessage
from streamhps.validation import (
    Reason,
    Rejected,
    check_dense_message,
    check_table_message,
)
from streamhps.worker.ingest import Ingestor, TableState
from streamhps.worker.staleness import LagTracker
from streamhps.worker.window import RecentRows

USER = TableSpec("user", dim=4, partitions=4)
ITEM = TableSpec("item", dim=4, partitions=1)
CONFIG = Config(
    tables=(USER, ITEM), topic_prefix="t", processor=ProcessorSettings(kafka_commit=False)
)
TOPIC = CONFIG.topic("user")


def _keys(partition: int, n: int = 6) -> np.ndarray:
    k = np.arange(1000, dtype=np.int64)
    return k[partition_of(k, USER.partitions) == partition][:n]


def _rows(n: int, value: float = 1.0, dtype: str = "float32", dim: int = 4) -> np.ndarray:
    return np.full((n, dim), value, dtype=dtype)


def _corpus() -> list[tuple[int, bytes | None, Reason | None]]:
    """(Kafka partition, value, the reason both must give or None) for every kind of message."""
    k0, k1 = _keys(0), _keys(1)
    good = wire.encode_update("user", k0, _rows(6), 3, partition=0)
    fp = bytearray(good)
    fp[2:10] = struct.pack("<Q", 0x1234)  # another schema's fingerprint
    nan = _rows(6)
    nan[2, 1] = np.nan
    inf16 = _rows(6, dtype="float16")
    inf16[0, 0] = np.inf
    U = Reason
    return [
        (0, good, None),
        (0, wire.encode_marker("user", 3, partition=0, dim=4), None),
        (1, wire.encode_update("user", k1, _rows(6), 4, partition=1), None),
        (0, b"definitely not avro", U.UNDECODABLE),
        (0, b"", U.UNDECODABLE),
        (0, None, U.UNDECODABLE),  # a tombstone
        (0, good[: len(good) // 2], U.UNDECODABLE),  # truncated
        (0, bytes(fp), U.SCHEMA_VERSION),
        (0, wire.encode_dense({"w": np.ones(3, np.float32)}, 3), U.UNEXPECTED_KIND),
        (0, wire.encode_update("item", k0, _rows(6), 3, partition=0), U.WRONG_TABLE),
        (0, wire.encode_update("nosuch", k0, _rows(6), 3, partition=0), U.UNKNOWN_TABLE),
        (0, wire.encode_update("user", k0, _rows(6), 0, partition=0), U.VERSION_NOT_POSITIVE),
        (0, wire.encode_marker("user", -2, partition=0, dim=4), U.VERSION_NOT_POSITIVE),
        (
            0,
            wire.encode_update("user", k0, _rows(6), 3, partition=0, row_versions=[1] * 5 + [0]),
            U.VERSION_NOT_POSITIVE,
        ),
        (0, wire.encode_update("user", k0, _rows(6, dim=5), 3, partition=0), U.WRONG_DIM),
        (0, wire.encode_update("user", k0, _rows(6, dtype="float16"), 3), U.WRONG_DTYPE),
        (0, wire.encode_update("user", k0, nan, 3, partition=0), U.NON_FINITE),
        (0, wire.encode_update("user", k0, inf16, 3, partition=0), U.WRONG_DTYPE),
        (0, wire.encode_update("user", k1, _rows(6), 3, partition=1), U.WRONG_PARTITION),
        (0, wire.encode_update("user", k1, _rows(6), 3, partition=0), U.WRONG_PARTITION),
        (
            0,
            wire.encode_update("user", np.r_[k0, k1[:1]], _rows(7), 3, partition=0),
            U.WRONG_PARTITION,
        ),
        (2, wire.encode_marker("user", 3, partition=0, dim=4), U.WRONG_PARTITION),
    ]


def _messages() -> list[FakeMessage]:
    offsets: dict[int, int] = {}
    out = []
    for p, value, _ in _corpus():
        off = offsets.get(p, 0)
        offsets[p] = off + 1
        out.append(FakeMessage(TOPIC, p, off, value))
    return out


@pytest.mark.parametrize(
    ("partition", "value", "reason"), _corpus(), ids=[str(r) for _, _, r in _corpus()]
)
def test_each_message_gets_its_reason(partition: int, value: bytes, reason: Reason) -> None:
    got = check_table_message(value, USER, partition, CONFIG_TABLES)
    if reason is None:
        assert isinstance(got, wire.Message)
    else:
        assert isinstance(got, Rejected) and got.reason is reason, got
        assert got.detail


CONFIG_TABLES = {t.name for t in CONFIG.tables}


def test_a_message_over_the_deployment_limit_is_oversized_before_it_is_decoded() -> None:
    good = next(v for _, v, r in _corpus() if r is None)
    assert isinstance(check_table_message(good, USER, 0, CONFIG_TABLES, len(good)), wire.Message)
    got = check_table_message(good, USER, 0, CONFIG_TABLES, len(good) - 1)
    assert isinstance(got, Rejected) and got.reason is Reason.OVERSIZED
    assert f"{len(good)} bytes" in got.detail and str(len(good) - 1) in got.detail


def test_dense_topic_checks() -> None:
    dense = wire.encode_dense({"w": np.ones(3, np.float32)}, 2)
    assert isinstance(check_dense_message(dense), wire.Message)
    for value, reason in (
        (b"junk", Reason.UNDECODABLE),
        (wire.encode_marker("user", 3), Reason.UNEXPECTED_KIND),
        (wire.encode_dense({"w": np.ones(3, np.float32)}, 0), Reason.VERSION_NOT_POSITIVE),
    ):
        got = check_dense_message(value)
        assert isinstance(got, Rejected) and got.reason is reason


class _Producer:
    """Records what a confluent-kafka Producer was asked to send; every message is acked."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Any, dict[str, bytes]]] = []

    def produce(self, topic: str, value: Any, key: Any = None, headers: Any = None,
                on_delivery: Any = None) -> None:  # fmt: skip
        self.sent.append((topic, value, dict(headers)))

    def poll(self, timeout: float = 0) -> int:
        return 0

    def flush(self, timeout: float = 0) -> int:
        return 0


def test_processor_and_worker_reject_the_same_messages_for_the_same_reasons(
    tmp_path: Path,
) -> None:
    msgs = _messages()
    expected = {
        (m.partition(), m.offset()): reason
        for m, (_, _, reason) in zip(msgs, _corpus(), strict=True)
        if reason is not None
    }

    # the processor's batch step, with a real store and the real dead-letter writer
    proc = Processor(CONFIG, str(tmp_path / "store"))
    producer = _Producer()
    proc.store = LmdbStore.open(tmp_path / "store", readonly=False)
    proc.store.ensure_tables({t.name: t for t in CONFIG.tables})
    proc._consumer = FakeConsumer([[]])  # type: ignore[assignment]
    proc._dead_letters = DeadLetterWriter(producer)
    proc._process(msgs)
    dead = {
        (int(h["source_partition"]), int(h["source_offset"])): h["reason"].decode()
        for _, _, h in producer.sent
    }
    assert {t for t, _, _ in producer.sent} == {f"{TOPIC}.dlq"}
    assert dead == {k: str(r) for k, r in expected.items()}
    values, versions, found = proc.store.get("user", np.r_[_keys(0), _keys(1)])
    assert found.all() and set(versions.tolist()) == {3, 4}  # only the good rows
    proc.store.close()

    # the worker's ingest step on the same messages
    tables = {
        spec.name: TableState(
            spec,
            CONFIG.topic(spec.name),
            make_cache("numpy", 1024, spec.dim),
            RecentRows(spec.dim, spec.np_dtype, spec.partitions),
        )  # fmt: skip
        for spec in CONFIG.tables
    }
    ing = Ingestor(
        FakeConsumer([msgs]), tables, "t.dense", LagTracker({t.name: t.partitions for t in CONFIG.tables}),
        MemoryStore(),  # holds nothing yet
    )  # fmt: skip
    ing.step()
    skipped = {(p, off): reason for _, p, off, reason in ing.rejections()["recent"]}
    assert skipped == dead
    _, hit = tables["user"].cache.lookup(np.r_[_keys(0), _keys(1)])
    assert hit.all()
    assert ing.counters.rows == 12
