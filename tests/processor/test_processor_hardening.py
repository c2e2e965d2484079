"""The processor under an operator's and an attacker's worst: every kind of poison interleaved
with good rows, and a storm of kill -9 under continuous publishing."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from streamhps import Publisher, TableSpec, wire
from streamhps.partitioning import partition_of
from streamhps.store import LmdbStore
from streamhps.testing import kill_processor, wait_for_applied_version, wait_for_offsets

pytestmark = [pytest.mark.integration, pytest.mark.slow]
DIM = 16
SPEC = TableSpec("user", dim=DIM, partitions=2)
LIMIT = (1 << 20) | 4096  # the deployment's message.max.bytes (the producer default)


def _keys_of(p: int, n: int) -> np.ndarray:
    k = np.arange(4 * n)
    return k[partition_of(k, 2) == p][:n]


def _poison(p: int) -> list[tuple[bytes | None, str]]:
    """One message of every bad kind for partition ``p``, with the reason it must be given."""
    keys = _keys_of(p, 8)
    good = np.ones((keys.size, DIM), np.float32)
    nan = good.copy()
    nan[2, 3] = np.nan
    whole = wire.encode_update("user", keys, good, 3, partition=p)
    big_keys = _keys_of(p, 18_000)  # 18k rows x 72 bytes: over message.max.bytes
    oversized = wire.encode_update(
        "user", big_keys, np.ones((big_keys.size, DIM), np.float32), 3, partition=p
    )
    assert len(oversized) > LIMIT
    return [
        (b"\x00\xffgarbage, not an envelope", "undecodable"),
        (bytes(whole[: len(whole) // 2]), "undecodable"),  # truncated envelope
        (wire.encode_update("user", keys, np.ones((8, DIM + 1), np.float32), 3, partition=p), "wrong_dim"),
        (wire.encode_update("user", keys, nan, 3, partition=p), "non_finite"),
        (wire.encode_update("user", keys, good, 0, partition=p), "version_not_positive"),
        (wire.encode_update("user", keys, good, -7, partition=p), "version_not_positive"),
        (wire.encode_marker("user", -1, partition=p, dim=DIM), "version_not_positive"),
        (wire.encode_update("nosuch", keys, good, 3, partition=p), "unknown_table"),
        (bytes(oversized), "oversized"),
        (b"", "undecodable"),  # empty
        (None, "undecodable"),  # tombstone
    ]  # fmt: skip


def _consume(bootstrap: str, topic: str, partitions: int, count: int) -> list:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"read-{topic}",
                  "auto.offset.reset": "earliest", "enable.auto.commit": False})  # fmt: skip
    c.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    got: list = []
    deadline = time.monotonic() + 30
    try:
        while len(got) < count and time.monotonic() < deadline:
            for m in c.consume(64, 0.5):
                if not m.error():
                    got.append(m)
    finally:
        c.close()
    return got


def test_every_kind_of_poison_interleaved_with_good_rows(
    bootstrap, prefix, tmp_path, run_processor, make_config
) -> None:
    """Each bad message lands on the DLQ once, with its reason and source; every good row
    around it is applied at its version; both partitions reach their end."""
    cfg = make_config(tmp_path / "c.toml", bootstrap, prefix)
    store = tmp_path / "store"
    with Publisher(bootstrap, [SPEC], prefix) as pub:
        pub.create_topics()
    proc = run_processor(cfg, store)
    topic = f"{prefix}.user"
    raw = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True,
                    "message.max.bytes": 4 << 20})  # fmt: skip
    expected_dlq: dict[tuple[int, int], tuple[bytes | None, str]] = {}
    next_offset = {0: 0, 1: 0}
    good_keys = {p: _keys_of(p, 40) for p in (0, 1)}
    version = 0
    for p in (0, 1):
        for bad in _poison(p):
            version += 1  # a good message before every bad one, each newer than the last
            vec = np.full((good_keys[p].size, DIM), version, np.float32)
            raw.produce(topic, wire.encode_update("user", good_keys[p], vec, version, partition=p),
                        partition=p)  # fmt: skip
            next_offset[p] += 1
            raw.produce(topic, bad[0], key=b"k", partition=p)
            expected_dlq[(p, next_offset[p])] = bad
            next_offset[p] += 1
    for p in (0, 1):
        raw.produce(topic, wire.encode_marker("user", version, partition=p, dim=DIM), partition=p)
        next_offset[p] += 1
    assert raw.flush(30) == 0

    wait_for_offsets(store, {(topic, p): n for p, n in next_offset.items()}, timeout=45, proc=proc)
    wait_for_applied_version(store, "user", version, proc=proc)
    last = {0: version - len(_poison(1)), 1: version}  # partition 0 was written first
    with LmdbStore.open(store, readonly=True) as st:
        for p in (0, 1):
            values, versions, found = st.get("user", good_keys[p])
            assert found.all() and (versions == last[p]).all() and (values == last[p]).all()
        assert st.stats()["tables"]["user"]["compaction"]["dlq"] == len(expected_dlq)
        # no bad row reached LMDB: only the good keys exist
        probe = np.arange(4 * 18_000)
        _, _, found = st.get("user", probe)
        assert set(probe[found].tolist()) == set(np.concatenate(list(good_keys.values())).tolist())

    letters = _consume(bootstrap, f"{topic}.dlq", 1, len(expected_dlq))
    assert len(letters) == len(expected_dlq)
    seen = set()
    for m in letters:
        h = {k: v.decode() for k, v in m.headers() or []}
        assert h["source_topic"] == topic
        where = (int(h["source_partition"]), int(h["source_offset"]))
        assert where not in seen, f"{where} dead-lettered twice"
        seen.add(where)
        value, reason = expected_dlq[where]
        assert h["reason"] == reason, (where, h)
        assert h["detail"]
        if reason == "oversized":
            assert value is not None and int(h["value_truncated_from"]) == len(value)
            assert len(m.value()) < LIMIT and value.startswith(m.value())
        else:
            assert m.value() == value and "value_truncated_from" not in h
    assert seen == set(expected_dlq)


class _Oracle:
    """Latest acknowledged version of every key; rows carry their version in every element."""

    def __init__(self, n: int) -> None:
        self.versions = np.zeros(n, np.int64)

    def apply(self, keys: np.ndarray, version: int) -> None:
        self.versions[keys] = np.maximum(self.versions[keys], version)


def test_kill_storm_under_continuous_publishing(
    bootstrap, prefix, tmp_path, run_processor, make_config
) -> None:
    """kill -9 the processor again and again while a trainer keeps publishing: every
    acknowledged row ends up in LMDB at its version, and no stored version ever goes back."""
    cfg = make_config(tmp_path / "c.toml", bootstrap, prefix)
    store = tmp_path / "store"
    n_keys = 5000
    oracle = _Oracle(n_keys)
    with Publisher(bootstrap, [SPEC], prefix) as pub:
        pub.create_topics()
    proc = run_processor(cfg, store)
    stop = threading.Event()
    errors: list[BaseException] = []
    committed = [0]

    def publish() -> None:
        rng = np.random.default_rng(5)
        try:
            with Publisher(bootstrap, [SPEC], prefix) as pub:
                v = 0
                while not stop.is_set() or v < 5:
                    v += 1
                    keys = rng.choice(n_keys, size=500, replace=False)
                    pub.publish("user", keys, np.full((500, DIM), v, np.float32), version=v)
                    pub.commit(v)  # acknowledged from here on
                    oracle.apply(keys, v)
                    committed[0] = v
                    time.sleep(0.01)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=publish)
    t.start()
    all_keys = np.arange(n_keys)
    seen = np.zeros(n_keys, np.int64)
    try:
        for _ in range(6):
            target = committed[0] + 5
            wait_for_applied_version(store, "user", target, timeout=45, proc=proc)
            kill_processor(proc)  # mid-batch, mid-publish
            with LmdbStore.open(store, readonly=True) as st:
                values, versions, found = st.get("user", all_keys)
            assert (versions >= seen).all(), "a stored version went back"
            assert (values[found] == versions[found, None]).all()  # row and version together
            seen = versions
            proc = run_processor(cfg, store)
    finally:
        stop.set()
        t.join(60)
    assert not errors, errors
    last = committed[0]
    assert last >= 6 * 5
    wait_for_applied_version(store, "user", last, timeout=45, proc=proc)
    with LmdbStore.open(store, readonly=True) as st:
        values, versions, found = st.get("user", all_keys)
    assert (versions >= seen).all()
    np.testing.assert_array_equal(versions, oracle.versions)  # nothing acknowledged was lost
    assert (values[found] == versions[found, None]).all()
