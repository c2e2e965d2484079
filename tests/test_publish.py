"""Publisher: what reaches a real broker, what is refused before sending, and delivery failures."""

from __future__ import annotations

import time
import uuid

import numpy as np
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from streamhps import (
    Publisher,
    PublishError,
    TableSpec,
    TopicError,
    UnknownTableError,
    ValidationError,
    VersionError,
    wire,
)
from streamhps.broker import free_port
from streamhps.partitioning import partition_of

USER = TableSpec("user", dim=64, dtype="float32", partitions=4)
ITEM = TableSpec("item", dim=16, dtype="float16", partitions=3)


def consume_all(
    bootstrap: str, topic: str, partitions: int, *, markers: int, timeout: float = 30.0
) -> list:
    """Raw confluent-kafka consumer: every message of the topic, until `markers` markers arrived."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"raw-{uuid.uuid4().hex}",
                  "enable.auto.commit": False, "auto.offset.reset": "earliest"})  # fmt: skip
    c.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    out, seen_markers, deadline = [], 0, time.monotonic() + timeout
    try:
        while seen_markers < markers and time.monotonic() < deadline:
            for m in c.consume(500, 0.5):
                if m.error():
                    continue
                d = wire.decode(m.value())
                out.append((m.partition(), d))
                seen_markers += d.is_marker
    finally:
        c.close()
    assert seen_markers == markers, f"only {seen_markers}/{markers} markers arrived"
    return out


@pytest.mark.integration
def test_publish_round_trip_100k_rows(bootstrap: str, prefix: str) -> None:
    rng = np.random.default_rng(1)
    n = 120_000
    keys = rng.choice(2**40, size=n, replace=False).astype(np.int64)
    vectors = rng.standard_normal((n, USER.dim)).astype(np.float32)
    ikeys = np.arange(5000, dtype=np.int64)
    ivec = rng.standard_normal((5000, ITEM.dim)).astype(np.float16)
    with Publisher(bootstrap, [USER, ITEM], prefix, {"linger.ms": 1}) as pub:
        assert set(pub.create_topics()) == {f"{prefix}.user", f"{prefix}.user.dlq", f"{prefix}.item",
                                            f"{prefix}.item.dlq", f"{prefix}.dense"}  # fmt: skip
        assert pub.create_topics() == []  # idempotent
        sent = pub.publish("user", keys, vectors, version=7)
        assert sent >= 4 * 6  # ~30k rows x 528 B per partition -> several ~1 MB messages each
        pub.publish("item", ikeys, ivec, version=7)
        pub.commit(7)
        assert pub.stats.failed == 0 and pub.stats.acked == pub.stats.messages

    got = consume_all(bootstrap, f"{prefix}.user", 4, markers=4)
    rows = [(p, d) for p, d in got if not d.is_marker]
    assert all(len(d.keys) and p == d.partition for p, d in rows)
    all_keys = np.concatenate([d.keys for _, d in rows])
    all_vec = np.concatenate([d.vectors for _, d in rows])
    all_parts = np.concatenate([np.full(len(d.keys), p) for p, d in rows])
    assert len(all_keys) == n
    assert np.array_equal(all_parts, partition_of(all_keys, 4))  # every row in its key's partition
    order = np.argsort(keys)
    pos = order[np.searchsorted(keys, all_keys, sorter=order)]
    assert np.array_equal(keys[pos], all_keys)
    assert np.array_equal(vectors[pos], all_vec)
    assert {d.version for _, d in got} == {7}
    # the marker is the last message of each partition: everything before it is version 7 complete
    last = {}
    for p, d in got:
        last[p] = d
    assert all(d.is_marker for d in last.values())

    items = consume_all(bootstrap, f"{prefix}.item", 3, markers=3)
    irows = [d for _, d in items if not d.is_marker]
    ik = np.concatenate([d.keys for d in irows])
    iv = np.concatenate([d.vectors for d in irows])
    assert iv.dtype == np.float16
    assert np.array_equal(iv[np.argsort(ik)], ivec)


@pytest.mark.integration
def test_dense_update_reaches_dense_topic(bootstrap: str, prefix: str) -> None:
    torch = pytest.importorskip("torch")
    state = {"w": torch.randn(32, 16), "b": torch.randn(32)}
    with Publisher(bootstrap, [USER], prefix) as pub:
        pub.create_topics()
        pub.publish_dense(state, version=3)
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": uuid.uuid4().hex,
            "auto.offset.reset": "earliest",
        }
    )
    c.assign([TopicPartition(f"{prefix}.dense", 0, 0)])
    msg = None
    deadline = time.monotonic() + 20
    while msg is None and time.monotonic() < deadline:
        m = c.poll(0.5)
        if m is not None and not m.error():
            msg = wire.decode(m.value())
    c.close()
    assert msg is not None and msg.is_dense and msg.version == 3
    assert np.array_equal(msg.tensors["w"], state["w"].numpy())


@pytest.mark.integration
def test_create_topics_refuses_partition_mismatch(bootstrap: str, prefix: str) -> None:
    with Publisher(bootstrap, [USER], prefix) as pub:
        pub.create_topics()
    with (
        Publisher(bootstrap, [TableSpec("user", 64, partitions=8)], prefix) as pub,
        pytest.raises(TopicError, match="exists with 4 partitions but the config says 8"),
    ):
        pub.create_topics()


# ---------------------------------------------------------------- refused before sending


@pytest.fixture
def offline_pub():
    """A publisher whose broker does not exist: refused calls must never reach produce()."""
    pub = Publisher(f"127.0.0.1:{free_port()}", [USER, ITEM], "x", {"message.timeout.ms": 1000})
    yield pub
    assert pub.stats.messages == 0, "a refused call queued messages"


def ok(n: int = 3, dim: int = 64, dtype: str = "float32") -> tuple[np.ndarray, np.ndarray]:
    return np.arange(n, dtype=np.int64), np.ones((n, dim), dtype=dtype)


@pytest.mark.parametrize(
    ("call", "error", "fragment"),
    [
        (lambda p: p.publish("users", *ok(), version=1), UnknownTableError, "unknown table 'users'"),
        (lambda p: p.publish("user", *ok(dim=32), version=1), ValidationError, "dim 64"),
        (lambda p: p.publish("user", *ok(dtype="float64"), version=1), ValidationError, "astype(np.float32)"),
        (lambda p: p.publish("item", *ok(dim=16, dtype="float32"), version=1), ValidationError, "stores float16"),
        (lambda p: p.publish("user", np.arange(3), np.ones((2, 64), np.float32), version=1), ValidationError, "3 keys but 2 vectors"),
        (lambda p: p.publish("user", np.array([1, 2, 1]), np.ones((3, 64), np.float32), version=1), ValidationError, "duplicate key"),
        (lambda p: p.publish("user", np.array([1.0, 2.0]), np.ones((2, 64), np.float32), version=1), ValidationError, "must be a 1-D array of integer ids"),
        (lambda p: p.publish("user", np.arange(3), np.full((3, 64), np.nan, np.float32), version=1), ValidationError, "NaN or Inf"),
        (lambda p: p.publish("user", np.arange(3), np.full((3, 64), np.inf, np.float32), version=1), ValidationError, "first: key 0"),
        (lambda p: p.publish("user", *ok(), version=0), VersionError, "> 0"),
        (lambda p: p.publish("user", *ok(), version=-3), VersionError, "> 0"),
        (lambda p: p.publish("user", *ok(), version=2.5), VersionError, "integer"),
        (lambda p: p.publish_dense({"w": np.array([np.nan])}, version=1), ValidationError, "NaN"),
        (lambda p: p.publish_dense({"w": np.zeros(400_000, np.float32)}, version=1), ValidationError, "message.max.bytes"),
    ],
)  # fmt: skip
def test_bad_input_refused_before_sending(offline_pub, call, error, fragment) -> None:
    with pytest.raises(error) as ei:
        call(offline_pub)
    assert fragment in str(ei.value)


def test_version_lower_than_committed_is_refused() -> None:
    pub = Publisher(f"127.0.0.1:{free_port()}", [USER], "x", last_committed_version=10)
    for v in (3, 10):
        with pytest.raises(VersionError, match="not newer than the committed version 10"):
            pub.publish("user", *ok(), version=v)
        with pytest.raises(VersionError, match="committed version 10"):
            pub.commit(v)
    assert pub.stats.messages == 0


def test_commit_below_published_version_is_refused(offline_pub) -> None:
    offline_pub.max_message_bytes = 10_000_000  # irrelevant; nothing is produced below
    offline_pub._max_published_version = 9  # as if rows of version 9 had been published
    with pytest.raises(VersionError, match="commit 9"):
        offline_pub.commit(8)


def test_unreachable_broker_while_learning_the_committed_version_says_what_to_do() -> None:
    pub = Publisher(f"127.0.0.1:{free_port()}", [USER], "x", learn_timeout=1.0)
    with pytest.raises(PublishError, match="last_committed_version=.*learn_committed=False"):
        pub.publish("user", *ok(), version=1)
    assert pub.stats.messages == 0


def test_committed_version_given_per_table_is_not_read_from_the_stream() -> None:
    pub = Publisher(
        f"127.0.0.1:{free_port()}", [USER, ITEM], "x", last_committed_version={"user": 7}
    )
    assert pub.committed_version("user") == 7 and pub.committed_version("item") is None
    with pytest.raises(VersionError, match=r"committed_version\('user'\) \+ 1"):
        pub.publish("user", *ok(), version=7)
    with pytest.raises(UnknownTableError):
        pub.committed_version("users")
    assert pub.stats.messages == 0


# ---------------------------------------------------------------- a restarted trainer


@pytest.mark.integration
def test_restarted_publisher_learns_the_committed_versions_and_refuses_lower(
    bootstrap: str, prefix: str
) -> None:
    """A new Publisher (a restarted trainer) learns each table's highest committed version from
    the markers, even behind rows of an unfinished version and poison, and refuses lower ones."""
    with Publisher(bootstrap, [USER, ITEM], prefix) as pub:
        assert pub.committed_version("user") is None  # topics not created yet: nothing committed
        pub.create_topics()
        for v in (3, 5):
            pub.publish("user", *ok(50), version=v)
            pub.commit(v)
        pub.publish("item", *ok(50, dim=16, dtype="float16"), version=6)
        pub.commit(6, tables=["item"])
        assert pub.committed_version("user") == 5 and pub.committed_version("item") == 6
    # The run crashes after publishing rows of version 7 in many small messages (longer than
    # the first window read back from each partition), before committing them.
    with Publisher(bootstrap, [USER], prefix, max_message_bytes=2000) as pub:
        pub.publish("user", *ok(1000), version=7)
        assert pub.stats.messages > 4 * (16 + 64)  # past the second window too
    raw = Producer({"bootstrap.servers": bootstrap})
    raw.produce(f"{prefix}.user", b"garbage at the tail", partition=0)
    assert raw.flush(10) == 0

    pub = Publisher(bootstrap, [USER, ITEM], prefix)
    assert pub.committed_version("user") == 5
    assert pub.committed_version("item") == 6
    for v in (1, 5):
        with pytest.raises(VersionError) as ei:
            pub.publish("user", *ok(), version=v)
        msg = str(ei.value)
        assert "committed version 5" in msg and "committed_version('user') + 1" in msg
    with pytest.raises(VersionError, match="committed version 6"):
        pub.commit(6)
    assert pub.stats.messages == 0
    pub.publish("user", *ok(), version=7)
    pub.commit(7)
    assert pub.committed_version("user") == pub.committed_version("item") == 7
    pub.close()
    assert Publisher(bootstrap, [USER], prefix).committed_version("user") == 7


@pytest.mark.integration
def test_learning_never_creates_topics_and_can_be_switched_off(bootstrap: str, prefix: str) -> None:
    pub = Publisher(bootstrap, [USER], prefix)
    assert pub.committed_version("user") is None
    admin = AdminClient({"bootstrap.servers": bootstrap})
    assert not [t for t in admin.list_topics(timeout=10).topics if t.startswith(prefix)]
    pub.create_topics()
    pub.publish("user", *ok(), version=9)
    pub.commit(9)
    pub.close()
    fresh = Publisher(bootstrap, [USER], prefix, learn_committed=False)
    assert fresh.committed_version("user") is None
    fresh.publish("user", *ok(), version=2)  # a new numbering, on purpose
    fresh.commit(2)
    fresh.close()


# ---------------------------------------------------------------- delivery failures


def test_dead_broker_fails_within_message_timeout() -> None:
    """Pointed at nothing, the publisher must fail, never report success (HugeCTR's does)."""
    pub = Publisher(
        f"127.0.0.1:{free_port()}", [USER], "x", {"message.timeout.ms": 1500}, learn_committed=False
    )
    pub.publish("user", *ok(10), version=1)
    t0 = time.monotonic()
    with pytest.raises(PublishError, match="not acknowledged|unacknowledged"):
        pub.flush()
    assert time.monotonic() - t0 < 1.5 + 5
    assert pub.stats.failed >= 1 and pub.stats.acked == 0
    with pytest.raises(PublishError):
        pub.commit(1)


def test_dead_broker_with_block_raises() -> None:
    with (
        pytest.raises(PublishError),
        Publisher(
            f"127.0.0.1:{free_port()}",
            [USER],
            "x",
            {"message.timeout.ms": 1000},
            learn_committed=False,
        ) as pub,
    ):
        pub.publish("user", *ok(), version=1)  # fmt: skip


@pytest.mark.integration
@pytest.mark.slow
def test_broker_dies_mid_stream_surfaces_failure(restartable_broker) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    pub = Publisher(
        restartable_broker.bootstrap_servers, [USER], prefix, {"message.timeout.ms": 2000}
    )
    pub.create_topics()
    pub.publish("user", *ok(100), version=1)
    pub.commit(1)
    restartable_broker.kill()
    pub.publish("user", *ok(100), version=2)
    with pytest.raises(PublishError):
        pub.commit(2)
    assert pub.stats.committed_version == 1  # the failed commit did not count


@pytest.mark.docker
def test_round_trip_on_real_apache_kafka(docker_kafka: str, prefix: str) -> None:
    keys, vectors = (
        np.arange(1000, dtype=np.int64),
        np.random.default_rng(0).random((1000, 64), np.float32),
    )
    with Publisher(docker_kafka, [USER], prefix) as pub:
        pub.create_topics()
        pub.publish("user", keys, vectors, version=1)
        pub.commit(1)
    got = consume_all(docker_kafka, f"{prefix}.user", 4, markers=4)
    k = np.concatenate([d.keys for _, d in got])
    assert np.array_equal(np.sort(k), keys)
