"""LMDB files and snapshots are private to their user (0600 files, 0700 directories), whatever
the process umask: rows and offsets are the model."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from streamhps import TableSpec
from streamhps.store import LmdbStore, WriteBatch


@pytest.fixture(params=[0o022, 0o000], ids=["umask-022", "umask-000"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _mode(p: Path) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_store_and_snapshot_files_are_0600_in_0700_directories(tmp_path: Path, umask) -> None:
    store_dir = tmp_path / "deep" / "store"
    with LmdbStore.open(store_dir, readonly=False) as st:
        st.ensure_tables({"user": TableSpec("user", dim=4)})
        b = WriteBatch()
        b.table_rows("user").add(np.arange(10), np.ones((10, 4), np.float32), np.ones(10, np.int64))
        st.write_batch(b)
        snap = st.snapshot(tmp_path / "snap")
    assert _mode(store_dir) == 0o700
    for name in ("data.mdb", "lock.mdb"):
        assert _mode(store_dir / name) == 0o600, name
    assert _mode(snap) == 0o700
    assert sorted(p.name for p in snap.iterdir()) == ["data.mdb"]
    assert _mode(snap / "data.mdb") == 0o600
    with LmdbStore.open(snap, readonly=True) as copy:  # the snapshot is a whole store
        _, versions, found = copy.get("user", np.arange(10))
        assert found.all() and (versions == 1).all()
    assert _mode(snap / "lock.mdb") == 0o600  # created by the first reader
