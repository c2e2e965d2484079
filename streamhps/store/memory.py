"""An in-memory store: the persistent tier's interface and rules without LMDB or a disk.

For tests of the logic above the store (the processor's batch step, the worker's ingest and
miss path): the same rules as :class:`~streamhps.store.lmdb_store.LmdbStore` (per key the
highest version wins, a row not newer than the stored one is dropped, applied versions only
rise, offsets and rows of a batch land together), and ``tests/store/test_store_contract.py``
holds both to them. Nothing survives the process: never a deployment's store.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from streamhps.config import TableSpec
from streamhps.errors import StoreError, UnknownTableError
from streamhps.keys import as_int64_keys
from streamhps.store.base import (
    NEW_STORE_ADVICE,
    StoreWriter,
    TableWriteResult,
    WriteBatch,
    absent_rows,
    check_store_shape,
)
from streamhps.store.compaction import latest_per_key


class _Table:
    """One table's rows, sorted by key."""

    def __init__(self, spec: TableSpec) -> None:
        self.spec = spec
        self.keys = np.empty(0, dtype=np.int64)
        self.vectors = np.empty((0, spec.dim), dtype=spec.np_dtype)
        self.versions = np.empty(0, dtype=np.int64)


def _locate(sorted_keys: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(position, found)`` of each of ``keys`` in ``sorted_keys``."""
    pos = np.searchsorted(sorted_keys, keys)
    found = np.zeros(keys.shape[0], dtype=bool)
    inside = pos < sorted_keys.shape[0]
    found[inside] = sorted_keys[pos[inside]] == keys[inside]
    return pos, found


class MemoryStore(StoreWriter):
    """A store held in this process's memory; thread-safe like the LMDB store."""

    def __init__(self, name: str = "memory") -> None:
        self.name = name
        self._lock = threading.Lock()
        self._tables: dict[str, _Table] = {}
        self._held: dict[str, list[int]] = {}
        self._offsets: dict[tuple[str, int], int] = {}
        self._applied: dict[tuple[str, int], int] = {}
        self._topic_ids: dict[str, str] = {}
        self._counters: dict[str, dict[str, int]] = {}
        self._batches = 0
        self._closed = False

    # ------------------------------------------------------------------ reader API

    def _table(self, table: str) -> _Table:
        if self._closed:
            raise StoreError(f"store {self.name} is closed")
        try:
            return self._tables[table]
        except KeyError:
            raise UnknownTableError(
                f"store {self.name} holds no table {table!r} (it holds {sorted(self._tables)})"
            ) from None

    def tables(self) -> dict[str, TableSpec]:
        with self._lock:
            return {n: t.spec for n, t in self._tables.items()}

    def held_partitions(self, table: str) -> list[int]:
        with self._lock:
            self._table(table)
            return list(self._held[table])

    def get(self, table: str, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        keys = as_int64_keys(keys, "keys", StoreError)
        with self._lock:
            t = self._table(table)
            idx, found = _locate(t.keys, keys)
            values, versions, _ = absent_rows(t.spec, keys.shape[0])
            values[found] = t.vectors[idx[found]]
            versions[found] = t.versions[idx[found]]
        return values, versions, found

    def applied_version(self, table: str) -> int | None:
        with self._lock:
            self._table(table)
            held = self._held[table]
            applied = {p: v for (n, p), v in self._applied.items() if n == table}
        if not held or any(p not in applied for p in held):
            return None
        return min(applied[p] for p in held)

    def partition_applied_versions(self, table: str) -> dict[int, int]:
        with self._lock:
            self._table(table)
            return {p: v for (n, p), v in self._applied.items() if n == table}

    def offsets(self) -> dict[tuple[str, int], int]:
        with self._lock:
            return dict(self._offsets)

    def topic_ids(self) -> dict[str, str]:
        with self._lock:
            return dict(self._topic_ids)

    def iter_rows(
        self, table: str, batch_rows: int = 65536
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        with self._lock:  # one snapshot: the arrays are replaced, never changed in place
            t = self._table(table)
            keys, vectors, versions = t.keys, t.vectors, t.versions
        for lo in range(0, keys.shape[0], batch_rows):
            hi = lo + batch_rows
            yield keys[lo:hi], vectors[lo:hi], versions[lo:hi]

    def row_count(self, table: str) -> int:
        with self._lock:
            return int(self._table(table).keys.shape[0])

    def stats(self) -> dict[str, Any]:
        with self._lock:
            tables = {
                n: {
                    "dim": t.spec.dim,
                    "dtype": t.spec.dtype,
                    "partitions": t.spec.partitions,
                    "held_partitions": list(self._held[n]),
                    "rows": int(t.keys.shape[0]),
                    "compaction": dict(self._counters.get(n, {})),
                }
                for n, t in self._tables.items()
            }
            return {
                "path": self.name,
                "tables": tables,
                "offsets": {f"{t}[{p}]": o for (t, p), o in self._offsets.items()},
                "batches": self._batches,
            }

    def close(self) -> None:
        self._closed = True

    # ------------------------------------------------------------------ writer API

    def ensure_tables(
        self, specs: Mapping[str, TableSpec], held: Mapping[str, list[int]] | None = None
    ) -> None:
        with self._lock:
            for name, spec in specs.items():
                old = self._tables.get(name)
                check_store_shape(spec, old.spec if old else None, self.name, NEW_STORE_ADVICE)
                if old is None:
                    self._tables[name] = _Table(spec)
                want = sorted(held[name]) if held and name in held else list(range(spec.partitions))
                self._held[name] = sorted(set(self._held.get(name, [])) | set(want))

    def write_batch(self, batch: WriteBatch) -> dict[str, TableWriteResult]:
        """Per key the highest version wins; a row not newer than the stored one is dropped; the
        rows, offsets and applied versions of the batch land together (under one lock)."""
        prepared = {t: latest_per_key(r) for t, r in batch.rows.items() if r.keys}
        results: dict[str, TableWriteResult] = {}
        with self._lock:
            for table in prepared:
                self._table(table)  # refuse an unknown table before anything changes
            for table, (keys, vectors, versions, rows_in) in prepared.items():
                t = self._tables[table]
                res = TableWriteResult(rows_in=rows_in, rows_duplicate=rows_in - keys.shape[0])
                pos, present = _locate(t.keys, keys)
                stored = np.zeros(keys.shape[0], dtype=np.int64)
                stored[present] = t.versions[pos[present]]
                keep = ~present | (versions > stored)
                replace = present & keep
                new = ~present
                vectors = np.asarray(vectors, dtype=t.spec.np_dtype)
                ks, vs, vers = t.keys.copy(), t.vectors.copy(), t.versions.copy()
                vs[pos[replace]], vers[pos[replace]] = vectors[replace], versions[replace]
                if new.any():
                    ks = np.concatenate([ks, keys[new]])
                    vs = np.concatenate([vs, vectors[new]])
                    vers = np.concatenate([vers, versions[new]])
                    order = np.argsort(ks, kind="stable")
                    ks, vs, vers = ks[order], vs[order], vers[order]
                t.keys, t.vectors, t.versions = ks, vs, vers
                res.rows_written = int(keep.sum())
                res.rows_stale = int(keys.shape[0] - res.rows_written)
                results[table] = res
            self._offsets.update(batch.offsets)
            for key, v in batch.applied.items():
                self._applied[key] = max(self._applied.get(key, 0), v)
            self._topic_ids.update(batch.topic_ids)
            for table in set(results) | set(batch.messages) | set(batch.dlq):
                c = self._counters.setdefault(table, {})
                r = results.get(table, TableWriteResult())
                for f in ("rows_in", "rows_written", "rows_duplicate", "rows_stale"):
                    c[f] = c.get(f, 0) + getattr(r, f)
                c["messages"] = c.get("messages", 0) + batch.messages.get(table, 0)
                c["dlq"] = c.get("dlq", 0) + batch.dlq.get(table, 0)
            self._batches += 1
        return results
