"""The LMDB tier on real files: versions, compaction, offsets, map growth, snapshots, readers."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from streamhps.config import TableSpec
from streamhps.errors import ConfigError, StoreError, UnknownTableError
from streamhps.store import LmdbStore, WriteBatch

SPEC = TableSpec("user", dim=8, dtype="float32", partitions=2)


def _batch(keys, versions, *, fill=None, offsets=None, applied=None) -> WriteBatch:
    keys = np.asarray(keys, dtype=np.int64)
    versions = np.broadcast_to(np.asarray(versions, dtype=np.int64), keys.shape).copy()
    vecs = (
        _vectors(keys, versions)
        if fill is None
        else np.full((keys.size, SPEC.dim), fill, np.float32)
    )
    b = WriteBatch(offsets=dict(offsets or {}), applied=dict(applied or {}))
    b.table_rows("user").add(keys, vecs, versions)
    return b


def _vectors(keys: np.ndarray, versions: np.ndarray) -> np.ndarray:
    """A vector that says which key and version wrote it."""
    return (keys[:, None] * 1000.0 + versions[:, None] + np.arange(SPEC.dim)[None, :] / 100).astype(
        np.float32
    )


@pytest.fixture
def store(tmp_path: Path):
    st = LmdbStore.open(tmp_path / "s", readonly=False)
    st.ensure_tables({"user": SPEC})
    yield st
    st.close()


def test_get_returns_rows_versions_and_found_mask(store: LmdbStore) -> None:
    store.write_batch(_batch([5, -3, 2**62, 7], [2, 1, 4, 3]))
    keys = np.array([7, 9, -3, 5, 7, 2**62])
    values, versions, found = store.get("user", keys)
    assert found.tolist() == [True, False, True, True, True, True]
    assert versions.tolist() == [3, 0, 1, 2, 3, 4]
    assert values.dtype == np.float32 and values.shape == (6, 8)
    np.testing.assert_array_equal(values[found], _vectors(keys[found], versions[found]))
    assert not values[1].any()  # not found: zeros
    ks = np.concatenate([k for k, _, _ in store.iter_rows("user", batch_rows=2)])
    assert ks.tolist() == [-3, 5, 7, 2**62]  # key order, signed


def test_highest_version_wins_within_and_across_batches(store: LmdbStore) -> None:
    rng = np.random.default_rng(1)
    oracle: dict[int, int] = {}
    for _ in range(30):
        keys = rng.integers(-50, 50, size=40)
        versions = rng.integers(1, 100, size=40)  # out of order, with repeats
        store.write_batch(_batch(keys, versions))
        for k, v in zip(keys.tolist(), versions.tolist(), strict=True):
            oracle[k] = max(oracle.get(k, 0), v)
    keys = np.array(sorted(oracle))
    values, versions, found = store.get("user", keys)
    assert found.all()
    assert versions.tolist() == [oracle[k] for k in keys.tolist()]
    np.testing.assert_array_equal(values, _vectors(keys, versions))


def test_replayed_batch_changes_nothing_and_is_counted_stale(store: LmdbStore) -> None:
    b = _batch(np.arange(100), 7, offsets={("p.user", 0): 10})
    r1 = store.write_batch(b)["user"]
    before = store.get("user", np.arange(100))
    r2 = store.write_batch(_batch(np.arange(100), 7, fill=-1.0))[
        "user"
    ]  # same versions, other data
    after = store.get("user", np.arange(100))
    assert (r1.rows_written, r2.rows_written, r2.rows_stale) == (100, 0, 100)
    for x, y in zip(before, after, strict=True):
        np.testing.assert_array_equal(x, y)
    c = store.stats()["tables"]["user"]["compaction"]
    assert (c["rows_in"], c["rows_written"], c["rows_stale"]) == (200, 100, 100)


def test_rows_below_a_partitions_highest_version_are_checked_against_the_store(
    store: LmdbStore,
) -> None:
    """A row newer than every version its partition ever stored is written without a read; any
    other row is compared with the stored one (the skip must never let an older row through)."""
    from streamhps.partitioning import partition_of

    keys = np.arange(40, dtype=np.int64)
    store.write_batch(_batch(keys, 10))
    p = partition_of(keys, SPEC.partitions)
    old, new = keys[p == 0][:3], keys[p == 0][3:6]  # stored at 10 / not stored, both partition 0
    fresh = np.arange(1000, 1003, dtype=np.int64)  # never stored
    b = _batch(np.concatenate([old, fresh]), 5)  # below partition 0's highest (10)
    res = store.write_batch(b)["user"]
    assert res.rows_stale == 3 and res.rows_written == 3
    _, v, _ = store.get("user", np.concatenate([old, fresh]))
    assert v.tolist() == [10, 10, 10, 5, 5, 5]
    res = store.write_batch(_batch(np.concatenate([old, new]), 11))["user"]  # above: no read
    assert res.rows_written == 6 and res.rows_stale == 0
    assert store.get("user", old)[1].tolist() == [11, 11, 11]


def test_a_store_without_highest_versions_reads_them_from_its_rows(tmp_path: Path) -> None:
    """A store written before the per-partition highest versions were kept: they are read once
    from the stored rows, so an older row still loses."""
    import lmdb

    path = tmp_path / "old"
    with LmdbStore.open(path, readonly=False) as st:
        st.ensure_tables({"user": SPEC})
        st.write_batch(_batch(np.arange(20), 10))
    env = lmdb.open(str(path), max_dbs=16)
    with env.begin(write=True) as txn:
        assert txn.delete(b"max_versions:user", db=env.open_db(b"meta", txn=txn))
    env.close()
    with LmdbStore.open(path, readonly=False) as st:
        res = st.write_batch(_batch(np.arange(20), 7))["user"]
        assert res.rows_stale == 20 and res.rows_written == 0
        assert st.get("user", np.arange(20))[1].tolist() == [10] * 20


def test_applied_version_needs_every_held_partition_and_never_goes_back(store: LmdbStore) -> None:
    assert store.applied_version("user") is None
    store.write_batch(WriteBatch(applied={("user", 0): 5}))
    assert store.applied_version("user") is None
    store.write_batch(WriteBatch(applied={("user", 1): 4}))
    assert store.applied_version("user") == 4
    store.write_batch(WriteBatch(applied={("user", 1): 2, ("user", 0): 9}))
    assert store.partition_applied_versions("user") == {0: 9, 1: 4}
    with pytest.raises(UnknownTableError, match="item"):
        store.applied_version("item")


def test_offsets_and_rows_commit_together(store: LmdbStore) -> None:
    store.write_batch(_batch([1, 2], 3, offsets={("p.user", 0): 11, ("p.user", 1): 4}))
    assert store.offsets() == {("p.user", 0): 11, ("p.user", 1): 4}
    store.write_batch(WriteBatch(offsets={("p.user", 1): 9}))
    assert store.offsets() == {("p.user", 0): 11, ("p.user", 1): 9}


def test_tiny_map_grows_without_losing_the_batch(tmp_path: Path) -> None:
    st = LmdbStore.open(tmp_path / "tiny", readonly=False, map_size=64 * 1024)
    st.ensure_tables({"user": SPEC})
    keys = np.arange(50_000)
    res = st.write_batch(_batch(keys, 1, offsets={("p.user", 0): 1}))["user"]
    assert res.rows_written == 50_000
    assert st.stats()["map_size"] > 64 * 1024
    _, versions, found = st.get("user", keys)
    assert found.all() and (versions == 1).all()
    assert st.offsets() == {("p.user", 0): 1}
    st.close()


def test_files_are_private_and_readonly_refuses_writes(store: LmdbStore, tmp_path: Path) -> None:
    assert os.stat(store.path).st_mode & 0o777 == 0o700
    assert os.stat(store.path / "data.mdb").st_mode & 0o777 == 0o600
    ro = LmdbStore.open(store.path, readonly=True)
    with pytest.raises(StoreError, match="read-only"):
        ro.write_batch(_batch([1], 1))
    ro.close()
    with pytest.raises(StoreError, match="no LMDB store"):
        LmdbStore.open(tmp_path / "nothing", readonly=True)


def test_changed_table_shape_is_refused(store: LmdbStore) -> None:
    with pytest.raises(ConfigError, match="dim=16"):
        store.ensure_tables({"user": TableSpec("user", dim=16, partitions=2)})


def test_snapshot_serves_the_same_rows_and_offsets(store: LmdbStore, tmp_path: Path) -> None:
    store.write_batch(
        _batch(
            np.arange(-500, 500),
            3,
            offsets={("p.user", 1): 77},
            applied={("user", 0): 3, ("user", 1): 3},
        )
    )
    out = store.snapshot(tmp_path / "snap")
    with LmdbStore.open(out, readonly=True) as snap:
        for a, b in zip(
            store.get("user", np.arange(-600, 600)),
            snap.get("user", np.arange(-600, 600)),
            strict=True,
        ):
            np.testing.assert_array_equal(a, b)
        assert snap.offsets() == {("p.user", 1): 77}
        assert snap.applied_version("user") == 3
        assert snap.tables() == store.tables()
    with pytest.raises(StoreError, match="not empty"):
        store.snapshot(out)


def test_reader_in_another_process_sees_each_commit(store: LmdbStore) -> None:
    """A read-only handle in another process sees offsets move as the writer commits."""
    code = textwrap.dedent(
        f"""
        import sys, numpy as np
        from streamhps.store import LmdbStore
        st = LmdbStore.open({str(store.path)!r}, readonly=True)
        for line in sys.stdin:
            _, v, f = st.get("user", np.array([1]))
            print(st.offsets().get(("p.user", 0)), int(v[0]), bool(f[0]), flush=True)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdin and proc.stdout
    seen = []
    for i in range(1, 4):
        store.write_batch(_batch([1], i, offsets={("p.user", 0): i * 10}))
        proc.stdin.write("\n")
        proc.stdin.flush()
        seen.append(proc.stdout.readline().split())
    proc.stdin.close()
    proc.wait(10)
    assert seen == [["10", "1", "True"], ["20", "2", "True"], ["30", "3", "True"]]


def test_first_reads_from_many_threads_at_once(tmp_path: Path) -> None:
    """HTTP threads and the ingest thread share one read-only store: their first reads open
    the database handles at the same time, and none of them may fail for it."""
    import threading

    with LmdbStore.open(tmp_path, readonly=False) as w:
        w.ensure_tables({"user": SPEC})
        w.write_batch(_batch([1, 2, 3], 1, offsets={("t.user", 0): 3}))
    keys = np.arange(8, dtype=np.int64)
    errors: list[str] = []
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often: the race shows within a few rounds
    try:
        for _ in range(30):
            st = LmdbStore.open(tmp_path, readonly=True)
            barrier = threading.Barrier(8)

            def read(st: LmdbStore = st, barrier: threading.Barrier = barrier) -> None:
                barrier.wait()
                try:
                    for _ in range(20):
                        assert st.get("user", keys)[2].sum() == 3
                        assert st.offsets() == {("t.user", 0): 3}
                        st.partition_applied_versions("user")
                except Exception as e:  # noqa: BLE001 - collected and reported below
                    errors.append(repr(e))

            threads = [threading.Thread(target=read) for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            st.close()
    finally:
        sys.setswitchinterval(old)
    assert not errors, f"{len(errors)} failed reads, e.g. {sorted(set(errors))[:3]}"
