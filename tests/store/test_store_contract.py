"""The rules every store keeps, held to the LMDB store and the in-memory one alike (the
in-memory store stands in for LMDB in tests of the logic above the store)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from streamhps.config import TableSpec
from streamhps.errors import ConfigError, UnknownTableError
from streamhps.store import LmdbStore, MemoryStore, StoreWriter, WriteBatch

USER = TableSpec("user", dim=3, partitions=2)


@pytest.fixture(params=["lmdb", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreWriter]:
    st: StoreWriter = (
        LmdbStore.open(tmp_path / "s", readonly=False) if request.param == "lmdb" else MemoryStore()
    )
    st.ensure_tables({"user": USER})
    yield st
    st.close()


def _batch(keys: list[int], versions: list[int], value: float = 0.0) -> WriteBatch:
    b = WriteBatch()
    k = np.asarray(keys, dtype=np.int64)
    v = np.asarray(versions, dtype=np.int64)
    vec = (np.arange(len(keys), dtype=np.float32)[:, None] + value) * np.ones(3, np.float32)
    b.table_rows("user").add(k, vec, v)
    return b


def test_per_key_the_highest_version_wins_and_older_rows_are_dropped(store: StoreWriter) -> None:
    # key 5 three times in one batch (versions 2, 4, 3), key -7 (a negative id) once
    r = store.write_batch(_batch([5, -7, 5, 5], [2, 1, 4, 3], value=10.0))["user"]
    assert (r.rows_in, r.rows_duplicate, r.rows_written, r.rows_stale) == (4, 2, 2, 0)
    values, versions, found = store.get("user", np.array([5, -7, 6], dtype=np.int64))
    assert found.tolist() == [True, True, False]
    assert versions.tolist() == [4, 1, 0]
    np.testing.assert_array_equal(values[0], np.full(3, 12.0, np.float32))  # the version-4 row
    np.testing.assert_array_equal(values[2], np.zeros(3, np.float32))
    # a later batch: an older version of 5 is stale, a newer one of -7 replaces it
    r = store.write_batch(_batch([5, -7], [3, 9], value=20.0))["user"]
    assert (r.rows_written, r.rows_stale) == (1, 1)
    _, versions, _ = store.get("user", np.array([5, -7], dtype=np.int64))
    assert versions.tolist() == [4, 9]
    keys = np.concatenate([k for k, _, _ in store.iter_rows("user", batch_rows=1)])
    assert keys.tolist() == [-7, 5]  # in key order, signed


def test_applied_versions_only_rise_and_cover_every_held_partition(store: StoreWriter) -> None:
    assert store.applied_version("user") is None
    b = WriteBatch()
    b.applied[("user", 0)] = 5
    b.offsets[("t.user", 0)] = 11
    b.topic_ids["t.user"] = "id-1"
    store.write_batch(b)
    assert store.applied_version("user") is None  # partition 1 has applied nothing yet
    b = WriteBatch()
    b.applied[("user", 0)] = 3  # older marker: ignored
    b.applied[("user", 1)] = 4
    store.write_batch(b)
    assert store.partition_applied_versions("user") == {0: 5, 1: 4}
    assert store.applied_version("user") == 4
    assert store.offsets() == {("t.user", 0): 11}
    assert store.topic_ids() == {"t.user": "id-1"}
    assert store.held_partitions("user") == [0, 1]


def test_a_table_of_another_shape_is_refused_and_an_unknown_one_named(
    store: StoreWriter,
) -> None:
    with pytest.raises(ConfigError, match=r"dim=4 .* holds dim=3.*new --store"):
        store.ensure_tables({"user": TableSpec("user", dim=4, partitions=2)})
    with pytest.raises(UnknownTableError, match="item"):
        store.get("item", np.array([1], dtype=np.int64))


def test_both_stores_end_in_the_same_state_after_the_same_batches(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    lm = LmdbStore.open(tmp_path / "s", readonly=False)
    mem = MemoryStore()
    for st in (lm, mem):
        st.ensure_tables({"user": USER})
    try:
        for _ in range(20):
            n = int(rng.integers(1, 50))
            keys = rng.integers(-40, 40, n).tolist()
            versions = rng.integers(1, 10, n).tolist()
            b = _batch(keys, versions, value=float(rng.integers(0, 100)))
            assert {t: vars(r) for t, r in lm.write_batch(b).items()} == {
                t: vars(r) for t, r in mem.write_batch(b).items()
            }
        probe = np.arange(-45, 45, dtype=np.int64)
        for a, b_ in zip(lm.get("user", probe), mem.get("user", probe), strict=True):
            np.testing.assert_array_equal(a, b_)
    finally:
        lm.close()
