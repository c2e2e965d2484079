"""The inference worker on the embedded broker with the CPU (numpy) cache: what a user sees."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from streamhps import wire
from streamhps.errors import (
    CacheError,
    MissingKeyError,
    StaleReadError,
    UnknownTableError,
    ValidationError,
)
from streamhps.store import LmdbStore
from streamhps.testing import wait_for_applied_version
from streamhps.worker import InferenceWorker

from .conftest import DIM, empty_store, table_rows, write_config

pytestmark = pytest.mark.integration

# ``ingest`` (tests/worker/conftest.py): the tests taking it run with the worker's ingest on
# threads, in a process of its own over a shared cache, and in one relaying its cache writes


def _wait(cond: Callable[[], bool], timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.005)
    return time.monotonic() - t0


def _applied_everywhere(w: InferenceWorker, version: int) -> bool:
    return all(r["applied_version"] == version for r in w.staleness()["user"].values())


def test_resident_rows_refreshed_within_a_second_of_commit(
    worker_env, tmp_path: Path, ingest: str
) -> None:
    _, cfg, pub = worker_env()
    store = empty_store(cfg, tmp_path / "store")
    keys = np.arange(5000, dtype=np.int64) * 7919
    pub.publish("user", keys, table_rows(keys, 1), 1)
    pub.commit(1)
    with InferenceWorker(cfg, store, ingest=ingest) as w:
        w.wait_ready(30)
        # ready means caught up with the head: every row of version 1 is served at once
        got = w.lookup("user", keys, consistency="bounded")
        assert (got[:, 0] == 1).all() and (got[:, 1] == keys % 1000).all()
        hits_before = w.stats()["lookups"]["hits"]
        for version in (2, 3):
            pub.publish("user", keys, table_rows(keys, version), version)
            pub.commit(version)
            elapsed = _wait(lambda v=version: bool((w.lookup("user", keys)[:, 0] == v).all()), 1.0,
                            f"version {version} in the cache")  # fmt: skip
            assert elapsed < 1.0
        s = w.stats()
        # served from the cache in place: no lookup had to go to the window or LMDB
        assert s["lookups"]["misses"] == 0 and s["lookups"]["hits"] > hits_before
        assert s["tables"]["user"]["cache"]["size"] == keys.shape[0]
        _wait(lambda: _applied_everywhere(w, 3), 2.0, "markers of version 3")
        assert all(r["versions_behind"] == 0 for r in w.staleness()["user"].values())


def test_worker_lowers_the_gil_switch_interval_never_raises_it(
    worker_env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """serving.switch_interval_ms (0.1 by default): Python's 5 ms made every GIL hand-over
    between the fetch, apply and request threads cost up to 5 ms of a lookup or an apply."""
    _, cfg, _ = worker_env()
    store = empty_store(cfg, tmp_path / "store")
    monkeypatch.setattr(sys, "setswitchinterval", lambda s: calls.append(s))
    calls: list[float] = []
    monkeypatch.setattr(sys, "getswitchinterval", lambda: 0.005)
    with InferenceWorker(cfg, store):
        assert calls == [pytest.approx(0.0001)]
    calls.clear()
    monkeypatch.setattr(sys, "getswitchinterval", lambda: 0.00005)  # already lower: left alone
    with InferenceWorker(cfg, store):
        assert calls == []


def test_lookup_input_errors_and_missing_policies(worker_env, tmp_path: Path) -> None:
    _, cfg, pub = worker_env(table={"missing": "error"}, serving={"max_lookup_keys": 100})
    store = empty_store(cfg, tmp_path / "store")
    keys = np.arange(10, dtype=np.int64)
    pub.publish("user", keys, table_rows(keys, 4), 4)
    pub.commit(4)
    with InferenceWorker(cfg, store) as w:
        w.wait_ready(30)
        with pytest.raises(ValidationError, match="1-D"):
            w.lookup("user", keys.reshape(2, 5))
        with pytest.raises(ValidationError, match="integers"):
            w.lookup("user", keys.astype(np.float64))
        with pytest.raises(ValidationError, match="max_lookup_keys"):
            w.lookup("user", np.arange(101))
        with pytest.raises(ValidationError, match="consistency"):
            w.lookup("user", keys, consistency="strong")
        with pytest.raises(UnknownTableError, match="nope"):
            w.lookup("nope", keys)
        with pytest.raises(MissingKeyError, match=r"2 key\(s\) were never published: 77, 99"):
            w.lookup("user", np.array([1, 99, 77, 2]))
        got = w.lookup("user", keys.astype(np.uint64))  # uint64 ids are taken as their bits
        assert (got[:, 0] == 4).all()
    for policy in ("zeros", "init:3"):
        _, cfg2, _ = worker_env(table={"missing": policy})
        with InferenceWorker(cfg2, store) as w:
            w.wait_ready(30)
            got = w.lookup("user", np.array([0, 123456789]))
            assert got[0, 0] == 4  # published
            if policy == "zeros":
                assert not got[1].any()
            else:
                from streamhps.worker import init_vectors

                np.testing.assert_array_equal(
                    got[1], init_vectors(np.array([123456789]), DIM, 3)[0]
                )
            assert w.stats()["lookups"]["from_missing"] == 1


def test_no_stale_resurrection_while_the_processor_is_paused(
    worker_env, processor_factory, tmp_path: Path, ingest: str
) -> None:
    """Newer versions of cold keys arrive while the processor is SIGSTOPped: LMDB still has the
    old rows, the worker has consumed the new ones; its read returns the newest."""
    path, cfg, pub = worker_env(
        table={"insert_on_update": False}, serving={"warm_from_store": False}
    )
    store = tmp_path / "store"
    proc = processor_factory(path, store)
    keys = np.arange(3000, dtype=np.int64) * 31
    pub.publish("user", keys, table_rows(keys, 1), 1)
    pub.commit(1)
    wait_for_applied_version(store, "user", 1, timeout=30, proc=proc)
    with InferenceWorker(cfg, store, ingest=ingest) as w:
        w.wait_ready(30)
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            pub.publish("user", keys, table_rows(keys, 2), 2)
            pub.commit(2)
            _wait(lambda: _applied_everywhere(w, 2), 5.0, "the worker to consume version 2")
            with LmdbStore.open(store, readonly=True) as st:
                _, lmdb_versions, found = st.get("user", keys)
            assert found.all() and (lmdb_versions == 1).all(), "the processor was not behind"
            assert w.stats()["tables"]["user"]["cache"]["size"] == 0  # the keys are cold
            got = w.lookup("user", keys)
            assert (got[:, 0] == 2).all() and (got[:, 1] == keys % 1000).all()
            s = w.stats()["lookups"]
            assert s["from_window"] == keys.shape[0] and s["window_over_store"] == keys.shape[0]
            # the read-through fill put version 2 (not LMDB's 1) into the cache
            _wait(
                lambda: w.stats()["tables"]["user"]["cache"]["size"] == keys.shape[0],
                2.0,
                "the fill",
            )
            got = w.lookup("user", keys)
            assert (got[:, 0] == 2).all()
            assert w.stats()["lookups"]["misses"] == keys.shape[0]  # the second read hit
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        wait_for_applied_version(store, "user", 2, timeout=30, proc=proc)
        _wait(lambda: w.stats()["tables"]["user"]["window_rows"] == 0, 5.0, "the window to empty")
        assert (w.lookup("user", keys)[:, 0] == 2).all()


def test_broker_killed_turns_worker_not_ready_and_bounded_reads_raise(
    restartable_broker, prefix, tmp_path: Path, ingest: str
) -> None:
    from streamhps import Publisher

    path, cfg = write_config(
        tmp_path / "cfg.toml",
        restartable_broker.bootstrap_servers,
        prefix,
        serving={"max_staleness_s": 1.0},
    )
    store = empty_store(cfg, tmp_path / "store")
    keys = np.arange(100, dtype=np.int64)
    with Publisher.from_config(cfg) as pub:
        pub.create_topics()
        pub.publish("user", keys, table_rows(keys, 1), 1)
        pub.commit(1)
    w = InferenceWorker(cfg, store, ingest=ingest).start()
    try:
        w.wait_ready(30)
        assert (w.lookup("user", keys, consistency="bounded")[:, 0] == 1).all()
        restartable_broker.kill()
        _wait(lambda: not w.ready(), 5.0, "the worker to turn not-ready")
        assert "behind the head" in (w.not_ready_reason() or "")
        assert all(r["seconds"] > 1.0 for r in w.staleness()["user"].values())
        with pytest.raises(StaleReadError, match="max_staleness_s"):
            w.lookup("user", keys, consistency="bounded")
        t0 = time.monotonic()
        with pytest.raises(StaleReadError):
            w.lookup("user", keys, consistency="bounded", timeout=0.3)
        assert time.monotonic() - t0 >= 0.3  # it waited for the deadline first
        # eventual reads keep serving what the worker holds
        assert (w.lookup("user", keys)[:, 0] == 1).all()
    finally:
        t0 = time.monotonic()
        w.stop()
        assert time.monotonic() - t0 < 20


def test_restart_from_lmdb_resumes_without_version_regression(
    worker_env, processor_factory, tmp_path: Path
) -> None:
    path, cfg, pub = worker_env()
    store = tmp_path / "store"
    proc = processor_factory(path, store)
    keys = np.arange(4000, dtype=np.int64)
    expected = np.ones(keys.shape[0], dtype=np.int64)
    pub.publish("user", keys, table_rows(keys, 1), 1)
    pub.commit(1)
    pub.publish("user", keys[::2], table_rows(keys[::2], 2), 2)
    pub.commit(2)
    expected[::2] = 2
    wait_for_applied_version(store, "user", 2, timeout=30, proc=proc)
    with InferenceWorker(cfg, store) as w1:
        w1.wait_ready(30)
        assert (w1.lookup("user", keys)[:, 0] == expected).all()
        assert w1.stats()["ingest"]["messages"] == 0  # the store was at the head already
    pub.publish("user", keys[::4], table_rows(keys[::4], 3), 3)
    pub.commit(3)
    expected[::4] = 3
    wait_for_applied_version(store, "user", 3, timeout=30, proc=proc)
    # the processor stalls; version 4 exists only on the stream when the worker restarts
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        before_v4 = pub.stats.messages
        pub.publish("user", keys[::8], table_rows(keys[::8], 4), 4)
        pub.commit(4)
        expected[::8] = 4
        with LmdbStore.open(store, readonly=True) as st:
            stored_offsets = st.offsets()
        with InferenceWorker(cfg, store) as w2:
            w2.wait_ready(30)
            s = w2.stats()
            assert s["tables"]["user"]["warmed_rows"] == keys.shape[0]
            # it tailed from the store's offsets, not from the beginning
            assert s["start_offsets"] == {
                f"{t}[{p}]": o for (t, p), o in stored_offsets.items() if t == cfg.topic("user")
            }
            assert s["ingest"]["messages"] == pub.stats.messages - before_v4  # only version 4's
            got = w2.lookup("user", keys)
            np.testing.assert_array_equal(got[:, 0].astype(np.int64), expected)
            assert all(r["applied_version"] == 4 for r in w2.staleness()["user"].values())
    finally:
        os.kill(proc.pid, signal.SIGCONT)


def test_bad_messages_are_skipped_with_their_reason_and_ingestion_continues(
    worker_env, bootstrap: str, tmp_path: Path
) -> None:
    """The worker skips what the processor dead-letters (streamhps.validation), counts it by
    reason, and writes no dead letter of its own (the processor's copy is the one record)."""
    _, cfg, pub = worker_env(table={"partitions": 1})
    store = empty_store(cfg, tmp_path / "store")
    topic = cfg.topic("user")
    good = np.arange(50, dtype=np.int64)
    bad: list[tuple[bytes | None, str]] = [
        (b"definitely not avro", "undecodable"),
        (wire.encode_update("other", good, table_rows(good, 1), 1), "unknown_table"),
        (wire.encode_update("user", good, table_rows(good, 1, dim=DIM + 1), 1), "wrong_dim"),
        (wire.encode_update("user", good, np.full((50, DIM), np.nan, np.float32), 1), "non_finite"),
        (wire.encode_update("user", good, table_rows(good, 1), 0), "version_not_positive"),
        (
            wire.encode_update("user", good, table_rows(good, 1).astype(np.float16), 1),
            "wrong_dtype",
        ),
        (bytes(wire.encode_update("user", good, table_rows(good, 1), 1)[:-100]), "undecodable"),
        (wire.encode_update("user", good, table_rows(good, 1), -3), "version_not_positive"),
        (wire.encode_marker("user", 0, dim=DIM), "version_not_positive"),
        (b"", "undecodable"),
        (None, "undecodable"),  # a tombstone
        (
            wire.encode_update("user", np.arange(40_000), table_rows(np.arange(40_000), 1), 1),
            "oversized",  # over the deployment's message.max.bytes (1 MiB + 4 KiB)
        ),
    ]
    with InferenceWorker(cfg, store) as w:
        w.wait_ready(30)
        offsets: list[tuple[str, int]] = []
        prod = Producer({"bootstrap.servers": bootstrap, "message.max.bytes": 8 << 20})
        for value, reason in bad:
            prod.produce(topic, value, partition=0,
                         on_delivery=lambda err, m, r=reason: offsets.append((r, m.offset())))  # fmt: skip
        prod.flush(10)
        pub.publish("user", good, table_rows(good, 5), 5)
        pub.commit(5)
        _wait(lambda: _applied_everywhere(w, 5), 5.0, "good rows after the bad ones")
        assert (w.lookup("user", good)[:, 0] == 5).all()
        assert w.ready()
        _wait(lambda: w.stats()["rejected"]["count"] == len(bad), 5.0, "rejections")
        rejected = w.stats()["rejected"]
    assert rejected["by_reason"] == Counter(r for _, r in bad)
    assert sorted((t, p, off, r) for t, p, off, r in rejected["recent"]) == sorted(
        (topic, 0, off, r) for r, off in offsets
    )
    dlq = Consumer({"bootstrap.servers": bootstrap, "group.id": f"dlq-{time.monotonic_ns()}"})
    try:
        lo, hi = dlq.get_watermark_offsets(TopicPartition(topic + ".dlq", 0), timeout=10)
    finally:
        dlq.close()
    assert hi == lo  # no processor runs here, and the worker wrote nothing


def test_dense_model_is_delivered(worker_env, tmp_path: Path, ingest: str) -> None:
    _, cfg, pub = worker_env()
    store = empty_store(cfg, tmp_path / "store")
    pub.publish_dense({"w": np.ones((4, 3), np.float32)}, 1)
    pub.flush()
    seen: list[int] = []
    with InferenceWorker(cfg, store, ingest=ingest) as w:
        w.on_dense(lambda v, t: seen.append(v))
        _wait(lambda: w.dense_model() is not None, 5.0, "the dense model")
        pub.publish_dense({"w": np.full((4, 3), 2, np.float32), "b": np.zeros(3, np.float32)}, 2)
        pub.flush()
        _wait(lambda: w.dense_model()[0] == 2, 5.0, "dense version 2")  # type: ignore[index]
        version, tensors = w.dense_model()  # type: ignore[misc]
        assert (tensors["w"] == 2).all() and tensors["b"].shape == (3,)
        assert seen == [1, 2]


def test_head_probe_does_not_wait_for_the_ingest_threads_consumer(
    worker_env, tmp_path: Path
) -> None:
    """confluent-kafka serialises calls on one Consumer across threads: a call from another
    thread waits until the ingest thread is out of consume(). A head probe that asked the
    worker's consumer for its cached watermark waited there (25 s on a loaded 2-core CI box,
    never ready again). Here every consume call of the idle ingest thread waits 5 s: the probe
    must make the worker ready regardless, and keep it ready across those waits."""
    _, cfg, pub = worker_env()
    keys = np.arange(100, dtype=np.int64)
    pub.publish("user", keys, table_rows(keys, 1), version=1)
    pub.commit(1)
    store = empty_store(cfg, tmp_path / "store")
    with InferenceWorker(cfg, store, poll_timeout_s=5.0) as w:
        w.wait_ready(30)
        time.sleep(1.0)  # inside a 5 s consume call now
        w.wait_ready(3.0)
        np.testing.assert_array_equal(w.lookup("user", keys), table_rows(keys, 1))


@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_a_cuda_worker_without_cupy_says_how_to_get_it_and_leaves_nothing_open(
    worker_env, tmp_path: Path, ingest: str, device: str
) -> None:
    try:
        import cupy  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("CuPy is installed here: the refusal is for machines without it")
    _, cfg, _ = worker_env()
    store = empty_store(cfg, tmp_path / "store")
    w = InferenceWorker(cfg, store, device=device, ingest=ingest)
    with pytest.raises(
        CacheError, match=r"needs CuPy and a CUDA GPU \(pip install 'streamhps\[gpu\]'\)"
    ):
        w.start()
    assert w._store is None and w._remote is None and not w.ready()
