"""Several LMDB environments read as one store: one environment per processor shard.

LMDB has one writer per environment, so a deployment with N processors (``processor --shard
I/N --store DIR_I``) has N environments, each holding the partitions ``p % N == I`` of every
table (recorded in the environment's meta as its *held* partitions). A reader that needs rows
of partitions from several of them opens them together::

    st = open_stores(["stores/0", "stores/1"])   # or open_stores("stores"): its sub-directories
    values, versions, found = st.get("user", keys)   # each key read from the store holding it

How ``--store`` is given (serve, the worker): a store directory (holds ``data.mdb``), several
of them (``--store A --store B``), or a directory whose sub-directories are store directories
(``stores/0``, ``stores/1``, ...: each processor's ``--store``). One environment is opened
as a plain :class:`~streamhps.store.LmdbStore`, as before.

A partition held by two environments is refused (which copy would be right?). A partition no
environment holds yet (its processor has not started) reads as not found until one does: the
holders are looked up again at most every ``resolve_interval_s``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from streamhps.config import TableSpec
from streamhps.errors import ConfigError, StoreError, UnknownTableError
from streamhps.keys import as_int64_keys
from streamhps.partitioning import partition_of
from streamhps.store.base import StoreReader, absent_rows
from streamhps.store.lmdb_store import LmdbStore

log = logging.getLogger(__name__)

StorePaths = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]


def wait_for_stores(paths: StorePaths, timeout: float, *, progress_every: float = 5.0) -> bool:
    """Wait up to ``timeout`` seconds until every store ``paths`` names exists (a processor
    creates it on its first start), logging progress; returns whether they all do. A worker
    started beside its processor uses this rather than failing at once."""
    start = time.monotonic()
    next_log = start
    while True:
        missing = [str(d) for d in store_dirs(paths) if not _has_tables(d)]
        if not missing:
            return True
        now = time.monotonic()
        if now - start >= timeout:
            log.warning("no store at %s after %.0f s of waiting", ", ".join(missing), timeout)
            return False
        if now >= next_log:
            log.info(
                "waiting for the processor to create the store at %s (%.0f s of %.0f s)",
                ", ".join(missing), now - start, timeout,
            )  # fmt: skip
            next_log = now + progress_every
        time.sleep(0.1)


def _has_tables(d: Path) -> bool:
    """The processor has created the store at ``d`` and its tables (it does both at start)."""
    if not (d / "data.mdb").exists():
        return False
    try:
        with LmdbStore.open(d, readonly=True) as st:
            return bool(st.tables())
    except StoreError:
        return False  # still being created; a damaged one is reported by the open after


def store_dirs(paths: StorePaths) -> list[Path]:
    """The environment directories ``paths`` names: each path itself when it holds
    ``data.mdb``, else its sub-directories that do (sorted), else the path (open reports it)."""
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not items:
        raise StoreError("no store given: pass --store DIR (repeatable)")
    out: list[Path] = []
    for item in items:
        p = Path(item)
        if (p / "data.mdb").exists() or not p.is_dir():
            out.append(p)
            continue
        subs = sorted(d for d in p.iterdir() if (d / "data.mdb").exists())
        out.extend(subs or [p])
    dupes = sorted({str(d) for d in out if out.count(d) > 1})
    if dupes:
        raise ConfigError(f"store(s) given twice: {dupes}")
    return out


def open_stores(paths: StorePaths) -> StoreReader:
    """Open read-only: one environment as an :class:`LmdbStore`, several as a :class:`ShardedStore`."""
    dirs = store_dirs(paths)
    if len(dirs) == 1:
        return LmdbStore.open(dirs[0], readonly=True)
    stores: list[LmdbStore] = []
    try:
        for d in dirs:
            stores.append(LmdbStore.open(d, readonly=True))
        return ShardedStore(stores)
    except BaseException:
        for s in stores:
            s.close()
        raise


class ShardedStore(StoreReader):
    """Read-only view over one environment per processor shard; routes by partition."""

    def __init__(self, stores: Sequence[LmdbStore], *, resolve_interval_s: float = 0.5) -> None:
        if not stores:
            raise StoreError("a sharded store needs at least one environment")
        self.stores = list(stores)
        self.path = ", ".join(str(s.path) for s in self.stores)
        self.resolve_interval_s = resolve_interval_s
        self._holders: dict[str, np.ndarray] = {}  # table -> store index per partition, -1 none
        self._specs: dict[str, TableSpec] = {}
        self._resolved_at = 0.0
        self._lock = threading.Lock()
        self._resolve(force=True)

    # ------------------------------------------------------------------ routing

    def _resolve(self, force: bool = False, want: str | None = None) -> dict[str, np.ndarray]:
        now = time.monotonic()
        complete = (want is None or want in self._holders) and all(
            (h >= 0).all() for h in self._holders.values()
        )
        if not force and (complete or now - self._resolved_at < self.resolve_interval_s):
            return self._holders
        with self._lock:
            specs = self.tables()
            holders: dict[str, np.ndarray] = {}
            for name, spec in specs.items():
                h = np.full(spec.partitions, -1, dtype=np.int64)
                for i, st in enumerate(self.stores):
                    if name not in st.tables():
                        continue
                    for p in st.held_partitions(name):
                        if h[p] >= 0 and h[p] != i:
                            raise ConfigError(
                                f"partition {p} of table {name!r} is held by two stores, "
                                f"{self.stores[h[p]].path} and {st.path}; give each processor "
                                "shard's store once"
                            )
                        h[p] = i
                holders[name] = h
            self._holders, self._specs, self._resolved_at = holders, specs, now
        return holders

    def holders(self, table: str) -> np.ndarray:
        """Index into :attr:`stores` of the environment holding each partition (-1: none yet)."""
        h = self._resolve(want=table).get(table)
        if h is None:
            raise UnknownTableError(
                f"table {table!r} is in none of the stores {self.path}; they hold "
                f"{sorted(self.tables())}"
            )
        return h

    def held_partitions(self, table: str) -> list[int]:
        return np.flatnonzero(self.holders(table) >= 0).tolist()

    # ------------------------------------------------------------------ reader API

    def tables(self) -> dict[str, TableSpec]:
        out: dict[str, TableSpec] = {}
        for st in self.stores:
            for name, spec in st.tables().items():
                old = out.get(name)
                if old is not None and (old.dim, old.dtype, old.partitions) != (
                    spec.dim,
                    spec.dtype,
                    spec.partitions,
                ):
                    raise ConfigError(
                        f"table {name!r} differs between the stores ({self.path}): "
                        f"dim/dtype/partitions {old.dim}/{old.dtype}/{old.partitions} vs "
                        f"{spec.dim}/{spec.dtype}/{spec.partitions}"
                    )
                out[name] = spec
        return out

    def get(self, table: str, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        keys = as_int64_keys(keys, "keys", StoreError)
        h = self.holders(table)
        spec = self._specs[table]
        values, versions, found = absent_rows(spec, keys.shape[0])
        if not keys.shape[0]:
            return values, versions, found
        where = h[partition_of(keys, spec.partitions)]
        for i in np.unique(where[where >= 0]).tolist():
            idx = np.flatnonzero(where == i)
            v, ver, f = self.stores[i].get(table, keys[idx])
            values[idx], versions[idx], found[idx] = v, ver, f
        return values, versions, found

    def get_many(
        self, keys: Mapping[str, np.ndarray]
    ) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """:meth:`get` of several tables: one read transaction per environment for all of them."""
        out: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        routed: dict[int, dict[str, np.ndarray]] = {}  # store -> table -> positions
        keyed: dict[str, np.ndarray] = {}
        for table, raw in keys.items():
            k = as_int64_keys(raw, f"keys of {table!r}", StoreError)
            try:
                h = self.holders(table)
            except UnknownTableError:
                continue
            spec = self._specs[table]
            n = k.shape[0]
            out[table] = (
                np.zeros((n, spec.dim), dtype=spec.np_dtype),
                np.zeros(n, dtype=np.int64),
                np.zeros(n, dtype=bool),
            )
            keyed[table] = k
            where = h[partition_of(k, spec.partitions)] if n else np.zeros(0, np.int64)
            for i in np.unique(where[where >= 0]).tolist():
                routed.setdefault(i, {})[table] = np.flatnonzero(where == i)
        for i, tables in routed.items():
            got = self.stores[i].get_many({t: keyed[t][idx] for t, idx in tables.items()})
            for t, idx in tables.items():
                if t in got:
                    v, ver, f = got[t]
                    values, versions, found = out[t]
                    values[idx], versions[idx], found[idx] = v, ver, f
        return out

    def partition_applied_versions(self, table: str) -> dict[int, int]:
        h = self.holders(table)
        out: dict[int, int] = {}
        for i, st in enumerate(self.stores):
            if not (h == i).any():
                continue
            for p, v in st.partition_applied_versions(table).items():
                if h[p] == i:
                    out[p] = v
        return out

    def applied_version(self, table: str) -> int | None:
        held = self.held_partitions(table)
        applied = self.partition_applied_versions(table)
        if not held or any(p not in applied for p in held):
            return None
        return min(applied[p] for p in held)

    def offsets(self) -> dict[tuple[str, int], int]:
        out: dict[tuple[str, int], int] = {}
        for st in self.stores:
            for tp, o in st.offsets().items():
                out[tp] = max(o, out.get(tp, o))
        return out

    def iter_rows(
        self, table: str, batch_rows: int = 65536
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Rows of every environment holding ``table``, in key order within each environment."""
        h = self.holders(table)
        for i, st in enumerate(self.stores):
            if (h == i).any():
                yield from st.iter_rows(table, batch_rows)

    def row_count(self, table: str) -> int:
        h = self.holders(table)
        return sum(st.row_count(table) for i, st in enumerate(self.stores) if (h == i).any())

    def stats(self) -> dict[str, Any]:
        return {"path": self.path, "stores": [st.stats() for st in self.stores]}

    def close(self) -> None:
        for st in self.stores:
            st.close()
