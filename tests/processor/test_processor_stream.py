"""The processor as a real subprocess against a real broker, writing real LMDB files."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from streamhps import wire
from streamhps.config import TableSpec
from streamhps.partitioning import partition_of
from streamhps.publish import Publisher
from streamhps.store import LmdbStore
from streamhps.testing import (
    kill_processor,
    stop_processor,
    wait_for_applied_version,
    wait_for_offsets,
)

pytestmark = pytest.mark.integration
DIM = 16
SPEC = TableSpec("user", dim=DIM, partitions=2)


class Oracle:
    """Latest acknowledged version and vector of every key (keys 0..n-1)."""

    def __init__(self, n: int) -> None:
        self.versions = np.zeros(n, np.int64)
        self.vectors = np.zeros((n, DIM), np.float32)

    def apply(self, keys: np.ndarray, vectors: np.ndarray, version: int) -> None:
        newer = self.versions[keys] < version
        self.versions[keys[newer]] = version
        self.vectors[keys[newer]] = vectors[newer]

    def assert_store_equals(self, store_dir: Path) -> None:
        keys = np.arange(self.versions.size)
        with LmdbStore.open(store_dir, readonly=True) as st:
            values, versions, found = st.get("user", keys)
        np.testing.assert_array_equal(found, self.versions > 0)
        np.testing.assert_array_equal(versions, self.versions)
        np.testing.assert_array_equal(values, self.vectors)


def _vectors(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.standard_normal((n, DIM)).astype(np.float32)


def test_stream_to_lmdb_replays_and_duplicates_change_nothing(
    bootstrap, prefix, tmp_path, run_processor, make_config
) -> None:
    cfg = make_config(tmp_path / "c.toml", bootstrap, prefix)
    store = tmp_path / "store"
    proc = run_processor(cfg, store)
    rng = np.random.default_rng(0)
    oracle = Oracle(3000)
    with Publisher(bootstrap, [SPEC], prefix) as pub:
        pub.create_topics()
        for v in range(1, 6):
            keys = rng.choice(3000, size=1500, replace=False)
            vec = _vectors(rng, keys.size)
            pub.publish("user", keys, vec, version=v)
            pub.commit(v)
            oracle.apply(keys, vec, v)
    wait_for_applied_version(store, "user", 5, proc=proc)
    oracle.assert_store_equals(store)

    # Replay every message of the topic again (old versions, duplicates): nothing may change.
    topic = f"{prefix}.user"
    with LmdbStore.open(store, readonly=True) as st:
        ends = st.offsets()
        written = st.stats()["tables"]["user"]["compaction"]["rows_written"]
    raw = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"{prefix}-replay",
            "auto.offset.reset": "earliest",
        }
    )
    c.assign([TopicPartition(topic, p, 0) for p in range(2)])
    replayed = 0
    deadline = time.monotonic() + 30
    while replayed < sum(ends.values()) and time.monotonic() < deadline:
        m = c.poll(0.5)
        if m is None or m.error() or m.offset() >= ends[(topic, m.partition())]:
            continue
        raw.produce(topic, m.value(), partition=m.partition())
        replayed += 1
    c.close()
    raw.flush(10)
    assert replayed == sum(ends.values())
    wait_for_offsets(store, {tp: 2 * off for tp, off in ends.items()}, proc=proc)
    oracle.assert_store_equals(store)
    with LmdbStore.open(store, readonly=True) as st:
        comp = st.stats()["tables"]["user"]["compaction"]
    assert comp["rows_written"] == written  # every replayed row was dropped as not newer
    assert comp["rows_in"] == 2 * 5 * 1500 and comp["dlq"] == 0


def test_out_of_order_versions_never_let_an_older_row_win(
    bootstrap, prefix, tmp_path, run_processor, make_config
) -> None:
    cfg = make_config(tmp_path / "c.toml", bootstrap, prefix)
    store = tmp_path / "store"
    with Publisher(bootstrap, [SPEC], prefix) as pub:
        pub.create_topics()
    proc = run_processor(cfg, store)
    keys = np.arange(200)
    parts = partition_of(keys, 2)
    raw = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    topic = f"{prefix}.user"
    # Version 9 first, then 4, then 7 (per-row versions), each in its own message and batch.
    for version, fill in ((9, 9.0), (4, 4.0), (7, 7.0)):
        for p in range(2):
            k = keys[parts == p]
            rv = np.full(k.size, version, np.int64)
            rv[::2] = version - 1  # row versions differ inside a message too
            raw.produce(
                topic,
                wire.encode_update(
                    "user",
                    k,
                    np.full((k.size, DIM), fill, np.float32),
                    version,
                    partition=p,
                    row_versions=rv,
                ),
                partition=p,
            )
        raw.flush(10)
        time.sleep(0.2)
    raw.flush(10)
    wait_for_offsets(store, {(topic, 0): 3, (topic, 1): 3}, proc=proc)
    with LmdbStore.open(store, readonly=True) as st:
        values, versions, found = st.get("user", keys)
    assert found.all()
    expected = np.where(np.arange(200) % 2 == 0, 8, 9)
    # every key keeps the row of the version-9 message (its rows are 8 or 9, higher than 4/6/7)
    for p in range(2):
        k_idx = np.flatnonzero(parts == p)
        np.testing.assert_array_equal(versions[k_idx], expected[: k_idx.size])
    assert (values == 9.0).all()


def test_kill_9_mid_stream_then_restart_matches_acknowledged_oracle(
    bootstrap, prefix, tmp_path, run_processor, make_config
) -> None:
    cfg = make_config(tmp_path / "c.toml", bootstrap, prefix)
    store = tmp_path / "store"
    rng = np.random.default_rng(2)
    oracle = Oracle(20_000)
    with Publisher(bootstrap, [SPEC], prefix) as pub:
        pub.create_topics()
    proc = run_processor(cfg, store)
    published = threading.Event()
    errors: list[BaseException] = []

    def publish() -> None:
        try:
            with Publisher(bootstrap, [SPEC], prefix) as pub:
                for v in range(1, 41):
                    keys = rng.choice(20_000, size=4000, replace=False)
                    vec = _vectors(rng, keys.size)
                    pub.publish("user", keys, vec, version=v)
                    pub.commit(v)  # acknowledged from here on
                    oracle.apply(keys, vec, v)
                    if v == 10:
                        published.set()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
            published.set()

    t = threading.Thread(target=publish)
    t.start()
    assert published.wait(60)
    wait_for_applied_version(store, "user", 3, proc=proc)
    kill_processor(proc)  # mid-stream: the publisher keeps going
    with LmdbStore.open(store, readonly=True) as st:
        at_kill = st.applied_version("user")
    proc = run_processor(cfg, store)
    t.join(120)
    assert not errors, errors
    started = time.monotonic()
    wait_for_applied_version(store, "user", 40, timeout=60, proc=proc)
    oracle.assert_store_equals(store)
    assert at_kill is not None and at_kill < 40
    assert time.monotonic() - started < 60
    assert stop_processor(proc) == 0  # SIGTERM: graceful


def test_poison_messages_go_to_the_dlq_and_the_partition_keeps_flowing(
    bootstrap, prefix, tmp_path, run_processor, make_config
) -> None:
    cfg = make_config(tmp_path / "c.toml", bootstrap, prefix)
    store = tmp_path / "store"
    with Publisher(bootstrap, [SPEC], prefix) as pub:
        pub.create_topics()
    proc = run_processor(cfg, store)
    topic = f"{prefix}.user"
    keys = np.array([k for k in range(100) if partition_of(np.array([k]), 2)[0] == 0][:10])
    good = np.ones((keys.size, DIM), np.float32)
    nan = good.copy()
    nan[3, 5] = np.nan
    poison = [
        (b"not a streamhps message", "undecodable"),
        (
            wire.encode_update(
                "user", keys, np.ones((keys.size, DIM + 1), np.float32), 3, partition=0
            ),
            "wrong_dim",
        ),
        (wire.encode_update("user", keys, nan, 3, partition=0), "non_finite"),
        (wire.encode_update("user", keys, good, 0, partition=0), "version_not_positive"),
        (wire.encode_update("nosuch", keys, good, 3, partition=0), "unknown_table"),
    ]
    raw = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    for value, _ in poison:
        raw.produce(topic, value, partition=0)
    raw.produce(topic, wire.encode_update("user", keys, good * 2, 5, partition=0), partition=0)
    raw.produce(topic, wire.encode_marker("user", 5, partition=0, dim=DIM), partition=0)
    raw.produce(topic, wire.encode_marker("user", 5, partition=1, dim=DIM), partition=1)
    raw.flush(10)
    wait_for_applied_version(store, "user", 5, proc=proc)
    with LmdbStore.open(store, readonly=True) as st:
        values, versions, found = st.get("user", keys)
        assert st.offsets()[(topic, 0)] == len(poison) + 2
        assert st.stats()["tables"]["user"]["compaction"]["dlq"] == len(poison)
    assert found.all() and (versions == 5).all() and (values == 2.0).all()

    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"{prefix}-dlq",
            "auto.offset.reset": "earliest",
        }
    )
    c.assign([TopicPartition(f"{topic}.dlq", 0, 0)])
    got = []
    deadline = time.monotonic() + 20
    while len(got) < len(poison) and time.monotonic() < deadline:
        m = c.poll(0.5)
        if m is not None and not m.error():
            got.append((m.value(), {k: v.decode() for k, v in m.headers() or []}))
    c.close()
    assert [v for v, _ in got] == [v for v, _ in poison]  # the original bytes, nothing lost
    for (_, h), (_, reason), off in zip(got, poison, range(len(poison)), strict=True):
        assert h["reason"] == reason
        assert (h["source_topic"], h["source_partition"], h["source_offset"]) == (
            topic,
            "0",
            str(off),
        )


@pytest.mark.slow
def test_broker_restart_under_a_running_processor_is_detected_and_survived(
    restartable_broker, prefix, tmp_path, run_processor, make_config
) -> None:
    """Invariant 7: the embedded broker loses every topic; the processor reports it, keeps
    its LMDB rows, and applies what is published after the restart."""
    bs = restartable_broker.bootstrap_servers
    cfg = make_config(tmp_path / "c.toml", bs, prefix)
    store = tmp_path / "store"
    keys = np.arange(1000)
    with Publisher(bs, [SPEC], prefix) as pub:
        pub.create_topics()
        proc = run_processor(cfg, store)
        for v in range(1, 4):  # 3 versions: the old log is longer than the new one below
            pub.publish("user", keys, np.full((1000, DIM), v, np.float32), version=v)
            pub.commit(v)
    wait_for_applied_version(store, "user", 3, proc=proc)
    before = LmdbStore.open(store, readonly=True)
    old_offsets = before.offsets()
    before.close()

    restartable_broker.stop()
    restartable_broker.start()
    with Publisher(bs, [SPEC], prefix) as pub:
        pub.create_topics()
        pub.publish("user", keys[:10], np.full((10, DIM), 4, np.float32), version=4)
        pub.commit(4)
    wait_for_applied_version(store, "user", 4, timeout=60, proc=proc)
    with LmdbStore.open(store, readonly=True) as st:
        values, versions, found = st.get("user", keys)
        new_offsets = st.offsets()
    assert found.all()
    assert (versions[:10] == 4).all() and (versions[10:] == 3).all()  # nothing discarded
    assert (values[10:] == 3).all()
    assert all(new_offsets[tp] < old_offsets[tp] for tp in old_offsets)  # resumed at the new log
    log = (tmp_path / "processor.log").read_text()
    assert "BROKER HISTORY LOST" in log and "recreated" in log
