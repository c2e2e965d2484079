"""A worker or server started on a damaged, foreign, read-only or not-yet-created store: a clear
error that names the file and says what to do (or a bounded wait), never a traceback or a
SIGBUS."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from streamhps import Config, StoreError, TableSpec
from streamhps.errors import ConfigError
from streamhps.store import LmdbStore, WriteBatch
from streamhps.store.shards import wait_for_stores
from streamhps.worker import InferenceWorker

SPEC = TableSpec("user", dim=8)
CONFIG = """topic_prefix = "bad"
[kafka]
"bootstrap.servers" = "127.0.0.1:1"
[[tables]]
name = "user"
dim = {dim}
"""


def _store(path: Path, rows: int = 50_000) -> Path:
    with LmdbStore.open(path, readonly=False) as st:
        st.ensure_tables({"user": SPEC})
        b = WriteBatch()
        b.table_rows("user").add(
            np.arange(rows), np.ones((rows, 8), np.float32), np.ones(rows, np.int64)
        )
        b.offsets[("bad.user", 0)] = 1
        st.write_batch(b)
    return path


def _damage(path: Path, how: str) -> None:
    data = path / "data.mdb"
    size = data.stat().st_size
    if how == "truncated to half":
        os.truncate(data, size // 2)
    elif how == "truncated to one page":
        os.truncate(data, 4096)
    elif how == "empty":
        os.truncate(data, 0)
    elif how == "header overwritten":
        with open(data, "r+b") as f:
            f.write(b"\xa5" * 8192)
    elif how == "pages overwritten":
        with open(data, "r+b") as f:
            f.seek(16384)
            f.write(np.random.default_rng(0).bytes(size - 16384))


DAMAGE = [
    "truncated to half",
    "truncated to one page",
    "empty",
    "header overwritten",
    "pages overwritten",
]


@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_store_is_refused_naming_data_mdb_and_what_to_do(tmp_path: Path, how) -> None:
    store = _store(tmp_path / "s")
    _damage(store, how)
    # a worker, and the processor that would write it (LMDB makes a new store of an empty file)
    for readonly in (True,) if how == "empty" else (True, False):
        with pytest.raises(StoreError) as ei:
            LmdbStore.open(store, readonly=readonly)
        msg = str(ei.value)
        assert str(store / "data.mdb") in msg
        assert "truncated" in msg and "snapshot" in msg and "rebuild" in msg


@pytest.mark.parametrize("how", ["truncated to half", "pages overwritten"])
def test_serve_on_a_damaged_store_prints_the_error_without_a_traceback(
    tmp_path: Path, how: str
) -> None:
    store = _store(tmp_path / "s")
    _damage(store, how)
    cfg = tmp_path / "c.toml"
    cfg.write_text(CONFIG.format(dim=8))
    r = subprocess.run(
        [sys.executable, "-m", "streamhps", "serve", "--config", str(cfg), "--store", str(store),
         "--port", "0", "--store-wait", "0"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "400"},
    )  # fmt: skip
    out = r.stdout + r.stderr
    assert r.returncode != 0 and r.returncode > 0  # an exit code, not a signal (SIGBUS)
    assert "Traceback" not in out
    assert "data.mdb" in out and "snapshot" in out


def test_a_store_written_for_another_dim_is_refused_with_both_shapes(tmp_path: Path) -> None:
    store = _store(tmp_path / "s")
    cfg = Config(tables=(TableSpec("user", dim=16),), topic_prefix="bad",
                 kafka={"bootstrap.servers": "127.0.0.1:1"})  # fmt: skip
    with pytest.raises(ConfigError) as ei:
        InferenceWorker(cfg, store).start()
    msg = str(ei.value)
    assert "dim=16" in msg and "dim=8" in msg and str(store) in msg and "--store" in msg


def test_a_read_only_store_directory(tmp_path: Path) -> None:
    """A reader registers in lock.mdb: in a read-only directory without one it cannot open. Root
    may write anyway, so there the store opens (nothing to refuse)."""
    store = _store(tmp_path / "s")
    (store / "lock.mdb").unlink()
    store.chmod(0o500)
    try:
        if os.geteuid() == 0:
            with LmdbStore.open(store, readonly=True) as st:
                assert st.offsets() == {("bad.user", 0): 1}
        else:
            with pytest.raises(StoreError) as ei:
                LmdbStore.open(store, readonly=True)
            msg = str(ei.value)
            assert "lock.mdb" in msg and "writable" in msg and "snapshot" in msg
    finally:
        store.chmod(0o700)


def test_a_worker_waits_for_the_processor_to_create_its_store(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = tmp_path / "later"
    caplog.set_level("INFO", logger="streamhps.store.shards")
    assert not wait_for_stores(store, 0.3)  # bounded: gives up
    assert "waiting for the processor to create the store" in caplog.text
    assert f"no store at {store}" in caplog.text

    def processor_starts_later() -> None:
        # Built beside and renamed into place: LMDB forbids one process to open an environment
        # twice at once, and this thread and the waiting one are one process (a processor is
        # another). Writing it in place here hung the suite once (both threads in LMDB's
        # lock-file mutex, beyond pytest-timeout's reach).
        time.sleep(0.5)
        os.rename(_store(tmp_path / "being-created", rows=10), store)

    t = threading.Thread(target=processor_starts_later)
    t.start()
    try:
        assert wait_for_stores(store, 60)
    finally:
        t.join()
    with LmdbStore.open(store, readonly=True) as st:
        assert "user" in st.tables()


def test_serve_before_the_store_exists_waits_then_says_what_is_missing(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(CONFIG.format(dim=8))
    r = subprocess.run(
        [sys.executable, "-m", "streamhps", "serve", "--config", str(cfg), "--store",
         str(tmp_path / "none"), "--port", "0", "--store-wait", "1"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "400"},
    )  # fmt: skip
    out = r.stdout + r.stderr
    assert r.returncode > 0 and "Traceback" not in out
    assert "waiting for the processor to create the store" in out
    assert "no LMDB store at" in out and "has the processor run" in out
