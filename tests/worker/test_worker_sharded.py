"""Sharded workers: only their partitions, rows from several processor stores, refusals that
name the owner."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from streamhps.errors import ConfigError, NotOwnedError
from streamhps.partitioning import partition_of
from streamhps.placement import plan
from streamhps.store import ShardedStore, open_stores
from streamhps.testing import start_processor, stop_processor, wait_for_applied_version
from streamhps.worker import InferenceWorker

from .conftest import table_rows

pytestmark = pytest.mark.integration

KEYS = np.arange(0, 2000, dtype=np.int64) * 7 + 3


@pytest.fixture
def two_stores(worker_env, tmp_path: Path):  # type: ignore[no-untyped-def]
    """Two processor shards (0/2, 1/2) of a 4-partition table, each with its own store."""
    path, cfg, pub = worker_env(table={"missing": "zeros"})
    pub.publish("user", KEYS, table_rows(KEYS, 1), version=1)
    pub.commit(1)
    stores = tmp_path / "stores"
    procs = [
        start_processor(path, stores / str(i), shard=f"{i}/2", log_path=tmp_path / f"proc{i}.log")
        for i in range(2)
    ]
    try:
        for i, proc in enumerate(procs):
            wait_for_applied_version(stores / str(i), "user", 1, timeout=60, proc=proc)
        yield path, cfg, pub, stores
    finally:
        for proc in procs:
            stop_processor(proc)


def _wait_for(cond, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_store_set_reads_each_partition_from_the_store_holding_it(two_stores) -> None:  # type: ignore[no-untyped-def]
    _, cfg, _, stores = two_stores
    st = open_stores(stores)  # a directory of processor stores
    try:
        assert isinstance(st, ShardedStore) and len(st.stores) == 2
        assert st.held_partitions("user") == [0, 1, 2, 3]
        assert st.holders("user").tolist() == [0, 1, 0, 1]
        values, versions, found = st.get("user", KEYS)
        assert found.all() and (versions == 1).all()
        np.testing.assert_array_equal(values, table_rows(KEYS, 1))
        assert st.applied_version("user") == 1
        assert sorted(p for (_, p) in st.offsets()) == [0, 1, 2, 3]
        assert sum(k.shape[0] for k, _, _ in st.iter_rows("user")) == KEYS.size
    finally:
        st.close()


def test_a_sharded_worker_serves_only_its_partitions_from_both_stores(two_stores, ingest) -> None:  # type: ignore[no-untyped-def]
    _, cfg, pub, stores = two_stores
    # partitions 0 (processor 0's store) and 1 (processor 1's): both stores are needed
    w = InferenceWorker(
        cfg, [stores / "0", stores / "1"], partitions={"user": [0, 1]}, follow_dense=False,
        ingest=ingest,
    )  # fmt: skip
    with w:
        w.wait_ready(30)
        parts = partition_of(KEYS, 4)
        mine, other = KEYS[parts <= 1], KEYS[parts > 1]
        np.testing.assert_array_equal(w.lookup("user", mine), table_rows(mine, 1))
        stats = w.stats()
        assert stats["tables"]["user"]["warmed_rows"] == mine.size  # only its partitions
        assert stats["shard"]["partitions"] == {"user": [0, 1]}
        assert sorted(w.staleness()["user"]) == [0, 1]
        with pytest.raises(NotOwnedError, match=r"key \d+ is in partition [23], served by another"):
            w.lookup("user", np.concatenate([mine[:3], other[:1]]))
        # updates after start reach it; bounded reads cover its partitions only
        pub.publish("user", mine[:50], table_rows(mine[:50], 2), version=2)
        pub.commit(2)
        _wait_for(lambda: (w.lookup("user", mine[:50])[:, 0] == 2).all())
        w.lookup("user", mine, consistency="bounded", timeout=10)


def test_a_placement_shard_refuses_keys_naming_the_owner_and_needs_every_store(
    two_stores, ingest
) -> None:  # type: ignore[no-untyped-def]
    _, cfg, _, stores = two_stores
    p = plan(cfg, 2, strategy="row")  # shard s: partitions p % 2 == s
    w = InferenceWorker(
        cfg, stores, placement=p, shard=1, warm_from_store=False, follow_dense=False,
        ingest=ingest,
    ).start()  # fmt: skip
    try:
        w.wait_ready(30)
        parts = partition_of(KEYS, 4)
        mine = KEYS[parts % 2 == 1]
        np.testing.assert_array_equal(w.lookup("user", mine), table_rows(mine, 1))
        assert w.stats()["lookups"]["from_store"] == mine.size
        with pytest.raises(NotOwnedError, match=r"not served by shard 1 of 2.*served by shard 0"):
            w.lookup("user", KEYS[parts == 2][:1])
        assert w._tables["user"].cache.capacity >= p.cache_rows(1)["user"]
    finally:
        w.stop()
    # partition 1 lives in processor 1's store: a worker given only store 0 refuses to start
    with pytest.raises(ConfigError, match=r"partitions \[1\] .* in none of the stores"):
        InferenceWorker(cfg, stores / "0", partitions={"user": [0, 1]}).start()
    with pytest.raises(ConfigError, match="shard= one of them"):
        InferenceWorker(cfg, stores, placement=p, shard=2)
