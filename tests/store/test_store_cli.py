"""``streamhps inspect`` and ``streamhps snapshot`` on a real store."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from streamhps.config import TableSpec
from streamhps.store import LmdbStore, WriteBatch


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streamhps", *args], capture_output=True, text=True, timeout=60
    )


def _make_store(path: Path) -> None:
    with LmdbStore.open(path, readonly=False) as st:
        st.ensure_tables({"user": TableSpec("user", dim=4, partitions=1)})
        for v in (1, 2):
            b = WriteBatch(offsets={("p.user", 0): 10 * v}, applied={("user", 0): v})
            keys = np.arange(100) if v == 1 else np.arange(50)
            b.table_rows("user").add(
                keys, np.full((keys.size, 4), v, np.float32), np.full(keys.size, v)
            )
            st.write_batch(b)


def test_inspect_json_reports_rows_versions_offsets_and_compaction(tmp_path: Path) -> None:
    _make_store(tmp_path / "s")
    r = _cli("inspect", "--store", str(tmp_path / "s"), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    user = info["tables"]["user"]
    assert (user["rows"], user["applied_version"]) == (100, 2)
    assert user["compaction"]["rows_in"] == 150 and user["compaction"]["rows_written"] == 150
    assert info["offsets"] == {"p.user[0]": 20}
    assert info["disk_bytes"] > 0
    human = _cli("inspect", "--store", str(tmp_path / "s"))
    assert human.returncode == 0 and "user" in human.stdout


def test_snapshot_cli_copy_opens_and_serves_the_same_rows(tmp_path: Path) -> None:
    _make_store(tmp_path / "s")
    r = _cli("snapshot", "--store", str(tmp_path / "s"), "--out", str(tmp_path / "snap"))
    assert r.returncode == 0, r.stderr
    with LmdbStore.open(tmp_path / "s") as a, LmdbStore.open(tmp_path / "snap") as b:
        keys = np.arange(-5, 120)
        for x, y in zip(a.get("user", keys), b.get("user", keys), strict=True):
            np.testing.assert_array_equal(x, y)
        assert b.offsets() == {("p.user", 0): 20} and b.applied_version("user") == 2
    again = _cli("snapshot", "--store", str(tmp_path / "s"), "--out", str(tmp_path / "snap"))
    assert again.returncode == 1 and "not empty" in again.stderr


def test_inspect_of_a_missing_store_says_so(tmp_path: Path) -> None:
    r = _cli("inspect", "--store", str(tmp_path / "none"))
    assert r.returncode == 1 and "no LMDB store" in r.stderr
