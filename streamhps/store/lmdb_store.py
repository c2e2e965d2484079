"""The LMDB implementation of the persistent tier (:class:`LmdbStore`).

One LMDB environment (a directory holding ``data.mdb`` and ``lock.mdb``) per shard of
partitions, i.e. per processor. The on-disk format is in :mod:`streamhps.store.lmdb_format`,
the environment handles and open errors in :mod:`streamhps.store.lmdb_env`, the per-key
compaction of a write batch in :mod:`streamhps.store.compaction`.

Durability knobs: py-lmdb's ``lmdb.Environment`` options, given to :meth:`LmdbStore.open`
(and from ``[processor]`` as ``lmdb_sync``, ``lmdb_metasync``, ``lmdb_writemap``,
``lmdb_map_async``). This is the one place they are documented. The defaults are the safe
ones; a process crash (kill -9) never loses a committed transaction whatever they are, the
risks below are of an OS crash or power loss:

* ``sync=True``: flush system buffers to disk on every commit. ``False`` skips the flush: a
  system crash can **corrupt the database or lose the last transactions** not yet flushed
  (py-lmdb's words). Only with ``writemap=False`` on a filesystem that keeps write order is
  integrity kept and just the last transactions undone. Lost transactions are replayed from
  Kafka only if the brokers still hold them; a corrupted store must be restored from a
  snapshot or rebuilt from the stream. ``streamhps demo`` runs its processor with
  ``lmdb_sync = false`` (a throwaway store, faster commits on one machine): a crash of that
  machine during the demo can lose or corrupt the demo's store.
* ``metasync=True``: flush the meta page on every commit. ``False`` omits that flush: the
  database keeps its integrity (atomicity, consistency, isolation) but a system crash may
  undo the last committed transaction (not durable).
* ``writemap=False``: ``True`` writes through a writable memory map (faster, fewer copies) but
  loses the protection from wild pointer writes in this process, which can then corrupt the
  file; processes with and without writemap on one environment do not cooperate well.
* ``map_async=False``: with ``writemap=True``, ``True`` flushes asynchronously: as with
  ``sync=False``, a system crash can corrupt the database or lose the last transactions.
* ``map_size`` (``[processor] map_size_bytes``, 1 GiB): the size of the memory map, i.e. the
  most the file may hold. A full map (``lmdb.MapFullError``) is doubled with
  ``Environment.set_mapsize`` and the whole transaction retried: no batch is lost; readers
  adopt the new size on their next transaction. On 64-bit a large map costs address space only.

Not in the config: ``max_readers=256`` (an argument of :meth:`LmdbStore.open`); fixed:
``lock=True``, ``max_dbs=4096``, ``readahead=False`` (reads are random key lookups),
``mode=0o700``. Closing a writable store calls
``Environment.sync(True)``, so a clean stop is on disk whatever ``sync`` says.

Files are created ``0600`` in a ``0700`` directory (embeddings are model data). Stale reader
slots left by crashed processes are cleared on every open.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict
from itertools import islice
from operator import itemgetter
from pathlib import Path
from typing import Any, TypeVar

import lmdb
import numpy as np

from streamhps.config import TableSpec
from streamhps.errors import StoreError, UnknownTableError
from streamhps.keys import as_int64_keys
from streamhps.partitioning import partition_of
from streamhps.store.base import (
    NEW_STORE_ADVICE,
    StoreWriter,
    TableWriteResult,
    WriteBatch,
    absent_rows,
    check_store_shape,
)
from streamhps.store.compaction import latest_per_key
from streamhps.store.lmdb_env import acquire_env, open_error, release_env
from streamhps.store.lmdb_format import (
    APPLIED,
    FORMAT,
    META,
    OFFSETS,
    decode_keys,
    encode_i64,
    encode_keys,
    parse_partition_key,
    partition_key,
    row_dtype,
)

log = logging.getLogger(__name__)

DEFAULT_MAP_SIZE = 1 << 30
_STAT_FIELDS = (
    "rows_in",
    "rows_written",
    "rows_duplicate",
    "rows_stale",
    "messages",
    "dlq",
    "batches",
)
_first = itemgetter(0)
_second = itemgetter(1)


def _max_versions_key(table: str) -> bytes:
    """``meta`` key of a table's highest written version per partition (int64 LE each)."""
    return b"max_versions:" + table.encode()


_ABSENT = object()
# LMDB: open_db must not run in two transactions of one process at once; it also guards the
# stores' handle tables, which threads share.
_HANDLES_LOCK = threading.Lock()
_F = TypeVar("_F", bound=Callable[..., Any])


class _NeedHandle(Exception):
    def __init__(self, name: bytes) -> None:
        self.name = name


def _reads(fn: _F) -> _F:
    """Retry a read method after opening the database handles it found missing.

    Several threads share one store (HTTP threads, the ingest thread): the handle table is
    changed under ``_HANDLES_LOCK`` only, and a read txn that began before another thread opened
    a handle it then uses gets EINVAL from LMDB; it is retried in a new txn, which sees it.
    """

    @functools.wraps(fn)
    def wrapper(self: LmdbStore, *args: Any, **kwargs: Any) -> Any:
        if self._absent:
            with _HANDLES_LOCK:
                for name in [k for k, v in self._dbs.items() if v is _ABSENT]:
                    del self._dbs[name]  # it may exist by now
                self._absent = False
        last: Exception | None = None
        for _ in range(64):
            try:
                return fn(self, *args, **kwargs)
            except _NeedHandle as e:
                self._open_handle(e.name)
            except lmdb.InvalidParameterError as e:
                last = e
        raise StoreError(f"cannot open the databases of {self.path}: {last}")

    return wrapper  # type: ignore[return-value]


class LmdbStore(StoreWriter):
    """One LMDB environment of the persistent tier. Open with :meth:`open`."""

    def __init__(self, env: lmdb.Environment, path: Path, readonly: bool) -> None:
        self._env = env
        self.path = path
        self.readonly = readonly
        self._dbs: dict[bytes, Any] = {}  # changed under _HANDLES_LOCK only
        self._absent = False  # some name in _dbs is _ABSENT
        self._specs: dict[str, TableSpec] | None = None
        self._held: dict[str, list[int]] = {}
        self._closed = False

    # ------------------------------------------------------------------ open / close

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        readonly: bool = True,
        *,
        map_size: int = DEFAULT_MAP_SIZE,
        sync: bool = True,
        metasync: bool = True,
        writemap: bool = False,
        map_async: bool = False,
        max_readers: int = 256,
    ) -> LmdbStore:
        """Open the store at directory ``path`` (created ``0700`` when writable).

        ``readonly=True`` opens beside a running writer in another process (LMDB's shared
        reader table). ``sync``, ``metasync``, ``writemap``, ``map_async``: the durability
        knobs, documented once in this module's docstring; the defaults are the safe ones. ``map_size`` is a starting size: it grows on demand.
        """
        p = Path(path)
        if readonly:
            if not (p / "data.mdb").exists():
                raise StoreError(
                    f"no LMDB store at {p} (no data.mdb); has the processor run with --store {p}?"
                )
        else:
            p.mkdir(mode=0o700, parents=True, exist_ok=True)
        env = acquire_env(
            p, readonly, map_size=map_size, sync=sync, metasync=metasync, writemap=writemap,
            map_async=map_async, max_readers=max_readers,
        )  # fmt: skip
        store = cls(env, p, readonly)
        try:
            if not readonly:
                with env.begin(write=True) as txn:
                    for name in (META, OFFSETS, APPLIED):
                        store._dbs[name] = env.open_db(name, txn=txn)
                    fmt = txn.get(b"format", db=store._dbs[META])
                    if fmt is None:
                        txn.put(b"format", FORMAT, db=store._dbs[META])
                    elif fmt != FORMAT:
                        raise StoreError(
                            f"{p} has store format {fmt!r}; this build writes {FORMAT!r}"
                        )
            # Read what every user reads first: damage past the header shows up here, not as a
            # traceback in the middle of serving.
            store.tables()
            store.offsets()
        except lmdb.Error as e:
            store.close()
            raise StoreError(open_error(p, e)) from e
        except BaseException:
            store.close()
            raise
        return store

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            release_env(self.path)

    def __enter__(self) -> LmdbStore:
        return self

    # ------------------------------------------------------------------ internals

    def _begin(self, write: bool = False) -> lmdb.Transaction:
        if self._closed:
            raise StoreError(f"store {self.path} is closed")
        for _ in range(3):
            try:
                # Values come back as bytes, not buffers=True memoryviews: py-lmdb makes one
                # GC-tracked memoryview per value, 3-4x slower than the copy on 65k-key reads
                # (bench/store_reads.py), and every caller copies the rows out anyway.
                return self._env.begin(write=write)
            except lmdb.MapResizedError:
                self._env.set_mapsize(0)  # the writer grew the map: adopt its size
        raise StoreError(f"cannot begin a transaction on {self.path}: map keeps resizing")

    def _db(self, name: bytes, txn: lmdb.Transaction, write: bool = False) -> Any:
        db = self._dbs.get(name)
        if db is _ABSENT:
            return None
        if db is None:
            if not write:
                # A read txn cannot use a handle opened after it began (and one opened inside
                # it dies with it): abort, open the handle outside, retry (see _reads).
                raise _NeedHandle(name)
            with _HANDLES_LOCK:
                db = self._env.open_db(name, txn=txn, create=True)
                self._dbs[name] = db
        return db

    def _open_handle(self, name: bytes) -> None:
        with _HANDLES_LOCK:
            if self._dbs.get(name) not in (None, _ABSENT):
                return  # another thread opened it meanwhile
            try:
                self._dbs[name] = self._env.open_db(name, create=False)
            except lmdb.NotFoundError:
                self._dbs[name] = _ABSENT
                self._absent = True

    def _load_meta(self, txn: lmdb.Transaction) -> dict[str, TableSpec]:
        meta = self._db(META, txn)
        raw = txn.get(b"tables", db=meta) if meta is not None else None
        specs: dict[str, TableSpec] = {}
        held: dict[str, list[int]] = {}
        for name, d in (json.loads(bytes(raw)) if raw else {}).items():
            held[name] = list(d.pop("held"))
            specs[name] = TableSpec(**d)
        self._specs, self._held = specs, held
        return specs

    def _spec(self, table: str, txn: lmdb.Transaction) -> TableSpec:
        specs = self._specs if self._specs and table in self._specs else self._load_meta(txn)
        try:
            return specs[table]
        except KeyError:
            raise UnknownTableError(
                f"table {table!r} is not in store {self.path}; it holds {sorted(specs)}"
            ) from None

    def _read_stats(self, txn: lmdb.Transaction) -> dict[str, Any]:
        meta = self._db(META, txn)
        raw = txn.get(b"stats", db=meta) if meta is not None else None
        return json.loads(bytes(raw)) if raw else {"tables": {}}

    # ------------------------------------------------------------------ reader API

    @_reads
    def tables(self) -> dict[str, TableSpec]:
        with self._begin() as txn:
            return dict(self._load_meta(txn))

    @_reads
    def held_partitions(self, table: str) -> list[int]:
        """Partitions of ``table`` this store (its processor shard) holds."""
        with self._begin() as txn:
            self._spec(table, txn)
            return list(self._held[table])

    @_reads
    def get(self, table: str, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        keys = as_int64_keys(keys, "keys", StoreError)
        with self._begin() as txn:
            spec = self._spec(table, txn)
            values, versions, found = absent_rows(spec, keys.shape[0])
            if not keys.shape[0]:
                return values, versions, found
            uniq, inverse = np.unique(keys, return_inverse=True)
            u_found, u_versions, u_vectors = self._read_rows(txn, spec, uniq)
        hit = u_found[inverse]
        found[:] = hit
        pos = np.cumsum(u_found) - 1  # index of each found unique key among the returned rows
        src = pos[inverse[hit]]
        versions[hit] = u_versions[src]
        values[hit] = u_vectors[src]
        return values, versions, found

    @_reads
    def get_many(
        self, keys: Mapping[str, np.ndarray]
    ) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """:meth:`get` of several tables in ONE read transaction (one snapshot of the store):
        table -> ``(values, versions, found)``. Tables the store does not hold yet are left out
        of the answer (none of their keys is found)."""
        out: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        with self._begin() as txn:
            for table, raw in keys.items():
                k = as_int64_keys(raw, f"keys of {table!r}", StoreError)
                try:
                    spec = self._spec(table, txn)
                except UnknownTableError:
                    continue
                n = k.shape[0]
                values = np.zeros((n, spec.dim), dtype=spec.np_dtype)
                versions = np.zeros(n, dtype=np.int64)
                if n and bool((k[1:] > k[:-1]).all()):  # already sorted and unique (the worker's)
                    found, u_versions, u_vectors = self._read_rows(txn, spec, k)
                    versions[found] = u_versions
                    values[found] = u_vectors
                elif n:
                    uniq, inverse = np.unique(k, return_inverse=True)
                    u_found, u_versions, u_vectors = self._read_rows(txn, spec, uniq)
                    found = u_found[inverse]
                    src = (np.cumsum(u_found) - 1)[inverse[found]]
                    versions[found] = u_versions[src]
                    values[found] = u_vectors[src]
                else:
                    found = np.zeros(0, dtype=bool)
                out[table] = (values, versions, found)
        return out

    def _read_rows(
        self, txn: lmdb.Transaction, spec: TableSpec, sorted_keys: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Batched read of sorted unique keys: ``(found mask, versions, vectors)`` of the found rows."""
        db = self._db(f"rows:{spec.name}".encode(), txn)
        rdt = row_dtype(spec)
        if db is None:
            return (
                np.zeros(sorted_keys.shape[0], bool),
                np.zeros(0, np.int64),
                np.zeros((0, spec.dim), rdt["vector"].base),
            )
        hits = txn.cursor(db).getmulti(encode_keys(sorted_keys))
        if not hits:
            return (
                np.zeros(sorted_keys.shape[0], bool),
                np.zeros(0, np.int64),
                np.zeros((0, spec.dim), rdt["vector"].base),
            )
        got = decode_keys(b"".join(map(_first, hits)))
        raw = b"".join(map(_second, hits))
        if len(raw) != len(hits) * rdt.itemsize:
            raise StoreError(
                f"rows of table {spec.name!r} in {self.path} are not {rdt.itemsize} bytes each; "
                "the store was written with another dim/dtype"
            )
        rows = np.frombuffer(raw, dtype=rdt)
        found = np.isin(sorted_keys, got, assume_unique=True)
        return found, rows["version"].astype(np.int64), rows["vector"]

    @_reads
    def applied_version(self, table: str) -> int | None:
        with self._begin() as txn:
            self._spec(table, txn)
            held = self._held[table]
            applied = self._partition_applied(txn, table)
        if not held or any(p not in applied for p in held):
            return None
        return min(applied[p] for p in held)

    @_reads
    def partition_applied_versions(self, table: str) -> dict[int, int]:
        with self._begin() as txn:
            self._spec(table, txn)
            return self._partition_applied(txn, table)

    def _partition_applied(self, txn: lmdb.Transaction, table: str) -> dict[int, int]:
        db = self._db(APPLIED, txn)
        if db is None:
            return {}
        prefix = table.encode() + b"\0"
        out: dict[int, int] = {}
        cur = txn.cursor(db)
        if cur.set_range(prefix):
            for k, v in cur:
                kb = bytes(k)
                if not kb.startswith(prefix):
                    break
                if len(kb) == len(prefix) + 4:
                    out[parse_partition_key(kb)[1]] = struct.unpack("<q", v)[0]
        return out

    @_reads
    def offsets(self) -> dict[tuple[str, int], int]:
        with self._begin() as txn:
            return self._offsets(txn)

    @_reads
    def topic_ids(self) -> dict[str, str]:
        """Topic -> broker topic id its stored offsets refer to (recorded by the processor)."""
        with self._begin() as txn:
            meta = self._db(META, txn)
            raw = txn.get(b"topic_ids", db=meta) if meta is not None else None
            return dict(json.loads(bytes(raw))) if raw else {}

    def _offsets(self, txn: lmdb.Transaction) -> dict[tuple[str, int], int]:
        db = self._db(OFFSETS, txn)
        if db is None:
            return {}
        return {parse_partition_key(k): struct.unpack("<q", v)[0] for k, v in txn.cursor(db)}

    def iter_rows(
        self, table: str, batch_rows: int = 65536
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        self.row_count(table)  # opens the handles outside the long read txn below
        with self._begin() as txn:
            spec = self._spec(table, txn)
            rdt = row_dtype(spec)
            db = self._db(f"rows:{table}".encode(), txn)
            if db is None:
                return
            it = iter(txn.cursor(db))
            while True:
                chunk = list(islice(it, batch_rows))
                if not chunk:
                    return
                rows = np.frombuffer(b"".join(map(_second, chunk)), dtype=rdt)
                yield (
                    decode_keys(b"".join(map(_first, chunk))),
                    np.ascontiguousarray(rows["vector"]).astype(spec.np_dtype, copy=False),
                    rows["version"].astype(np.int64),
                )

    @_reads
    def row_count(self, table: str) -> int:
        with self._begin() as txn:
            self._spec(table, txn)
            db = self._db(f"rows:{table}".encode(), txn)
            return int(txn.stat(db)["entries"]) if db is not None else 0

    @_reads
    def stats(self) -> dict[str, Any]:
        with self._begin() as txn:
            specs = self._load_meta(txn)
            counters = self._read_stats(txn)
            tables: dict[str, Any] = {}
            for name, spec in specs.items():
                db = self._db(f"rows:{name}".encode(), txn)
                c = counters.get("tables", {}).get(name, {})
                rows_in = int(c.get("rows_in", 0))
                applied = self._partition_applied(txn, name)
                held = self._held[name]
                tables[name] = {
                    "dim": spec.dim,
                    "dtype": spec.dtype,
                    "partitions": spec.partitions,
                    "held_partitions": held,
                    "rows": int(txn.stat(db)["entries"]) if db is not None else 0,
                    "applied_version": (
                        min(applied[p] for p in held)
                        if held and all(p in applied for p in held)
                        else None
                    ),
                    "partition_applied_versions": {str(p): v for p, v in sorted(applied.items())},
                    "compaction": {
                        **{f: int(c.get(f, 0)) for f in _STAT_FIELDS if f != "batches"},
                        "compaction_ratio": (rows_in / c["rows_written"])
                        if c.get("rows_written")
                        else None,
                    },
                }
            offsets = self._offsets(txn)
        info = self._env.info()
        data = self.path / "data.mdb"
        st = data.stat()
        return {
            "path": str(self.path),
            "file_bytes": st.st_size,
            "disk_bytes": st.st_blocks * 512,
            "map_size": info["map_size"],
            "used_bytes": (info["last_pgno"] + 1) * self._env.stat()["psize"],
            "readers": info["num_readers"],
            "batches": int(counters.get("batches", 0)),
            "last_commit_unix": counters.get("last_commit_unix"),
            "tables": tables,
            "offsets": {f"{t}[{p}]": o for (t, p), o in sorted(offsets.items())},
            "topic_ids": self.topic_ids(),
        }

    # ------------------------------------------------------------------ writer API

    def _writable(self) -> None:
        if self.readonly:
            raise StoreError(f"store {self.path} was opened read-only")

    def ensure_tables(
        self, specs: Mapping[str, TableSpec], held: Mapping[str, list[int]] | None = None
    ) -> None:
        self._writable()
        with self._begin(write=True) as txn:
            stored = dict(self._load_meta(txn))
            held_all = dict(self._held)
            for name, spec in specs.items():
                check_store_shape(spec, stored.get(name), str(self.path), NEW_STORE_ADVICE)
                stored[name] = spec
                want = sorted(held[name]) if held and name in held else list(range(spec.partitions))
                held_all[name] = sorted(set(held_all.get(name, [])) | set(want))
                self._db(f"rows:{name}".encode(), txn, write=True)
            doc = {n: {**asdict(s), "held": held_all[n]} for n, s in stored.items()}
            txn.put(
                b"tables",
                json.dumps(doc, sort_keys=True).encode(),
                db=self._db(META, txn, write=True),
            )
        self._specs, self._held = stored, held_all

    def write_batch(self, batch: WriteBatch) -> dict[str, TableWriteResult]:
        """Compact ``batch`` and apply it in one write transaction.

        Per key the highest version wins; a row not newer than the stored one is dropped.
        A full map is grown and the transaction retried from scratch.
        """
        self._writable()
        prepared = {t: latest_per_key(r) for t, r in batch.rows.items() if r.keys}
        while True:
            try:
                return self._write_txn(batch, prepared)
            except lmdb.MapFullError:
                old = self._env.info()["map_size"]
                new = old * 2
                self._env.set_mapsize(new)
                log.warning(
                    "LMDB map of %s is full at %d bytes; grew it to %d and retried the batch",
                    self.path,
                    old,
                    new,
                )

    def _write_txn(
        self, batch: WriteBatch, prepared: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, int]]
    ) -> dict[str, TableWriteResult]:
        results: dict[str, TableWriteResult] = {}
        with self._begin(write=True) as txn:
            for table, (keys, vectors, versions, rows_in) in prepared.items():
                spec = self._spec(table, txn)
                res = TableWriteResult(rows_in=rows_in, rows_duplicate=rows_in - keys.shape[0])
                db = self._db(f"rows:{table}".encode(), txn, write=True)
                enc = encode_keys(keys)
                # Only rows a stored row can beat are checked against the store: a row newer
                # than every version ever written to its partition wins without a read (the
                # usual case: a trainer's versions only grow), so no stored row is read at all.
                top = self._max_versions(txn, table, spec, db)
                parts = partition_of(keys, spec.partitions)
                unsure = np.flatnonzero(versions <= top[parts])
                keep = np.ones(keys.shape[0], dtype=bool)
                if unsure.size:
                    asked = enc if unsure.size == len(enc) else encode_keys(keys[unsure])
                    hits = txn.cursor(db).getmulti(asked)
                    if hits:
                        got = decode_keys(b"".join(map(_first, hits)))
                        stored_v = np.frombuffer(
                            b"".join(map(_second, hits)), dtype=row_dtype(spec)
                        )["version"]
                        idx = np.searchsorted(keys, got)
                        keep[idx[stored_v >= versions[idx]]] = False
                rdt = row_dtype(spec)
                n_keep = int(keep.sum())
                rows = np.empty(n_keep, dtype=rdt)
                if n_keep == keys.shape[0]:  # the usual case: no gathered copies of it all
                    enc_keep, kept_v, kept_parts = enc, versions, parts
                    rows["vector"] = vectors
                else:
                    enc_keep = encode_keys(keys[keep])
                    kept_v, kept_parts = versions[keep], parts[keep]
                    rows["vector"] = vectors[keep]
                rows["version"] = kept_v
                if n_keep:
                    txn.cursor(db).putmulti(
                        zip(enc_keep, rows.view(f"V{rdt.itemsize}").tolist(), strict=True)
                    )
                    np.maximum.at(top, kept_parts, kept_v)
                txn.put(_max_versions_key(table), top.tobytes(), db=self._db(META, txn, True))
                res.rows_written = n_keep
                res.rows_stale = keys.shape[0] - n_keep
                results[table] = res
            offsets_db, applied_db = self._db(OFFSETS, txn, True), self._db(APPLIED, txn, True)
            for (topic, p), off in batch.offsets.items():
                txn.put(partition_key(topic, p), encode_i64(off), db=offsets_db)
            for (table, p), v in batch.applied.items():
                old = txn.get(partition_key(table, p), db=applied_db)
                if old is None or struct.unpack("<q", old)[0] < v:
                    txn.put(partition_key(table, p), encode_i64(v), db=applied_db)
            if batch.topic_ids:
                meta = self._db(META, txn, True)
                raw = txn.get(b"topic_ids", db=meta)
                ids = {**(json.loads(bytes(raw)) if raw else {}), **batch.topic_ids}
                txn.put(b"topic_ids", json.dumps(ids, sort_keys=True).encode(), db=meta)
            stats = self._read_stats(txn)
            for table in set(results) | set(batch.messages) | set(batch.dlq):
                c = stats["tables"].setdefault(table, {})
                r = results.get(table, TableWriteResult())
                for f in ("rows_in", "rows_written", "rows_duplicate", "rows_stale"):
                    c[f] = c.get(f, 0) + getattr(r, f)
                c["messages"] = c.get("messages", 0) + batch.messages.get(table, 0)
                c["dlq"] = c.get("dlq", 0) + batch.dlq.get(table, 0)
            stats["batches"] = stats.get("batches", 0) + 1
            stats["last_commit_unix"] = time.time()
            txn.put(b"stats", json.dumps(stats).encode(), db=self._db(META, txn, True))
        return results

    def _max_versions(
        self, txn: lmdb.Transaction, table: str, spec: TableSpec, db: Any
    ) -> np.ndarray:
        """Per partition, the highest version ever written to a row of ``table`` (-1: none)."""
        raw = txn.get(_max_versions_key(table), db=self._db(META, txn, True))
        if raw is not None and len(raw) == 8 * spec.partitions:
            return np.frombuffer(raw, dtype="<i8").astype(np.int64)
        # A store written before this record existed: read every stored version once.
        top = np.full(spec.partitions, -1, dtype=np.int64)
        n = int(txn.stat(db)["entries"])
        if n:
            log.info("%s: reading the versions of %d stored rows of %r once", self.path, n, table)
            rdt = row_dtype(spec)
            it = iter(txn.cursor(db))
            while chunk := list(islice(it, 65536)):
                k = decode_keys(b"".join(map(_first, chunk)))
                v = np.frombuffer(b"".join(map(_second, chunk)), dtype=rdt)["version"]
                np.maximum.at(top, partition_of(k, spec.partitions), v.astype(np.int64))
        return top

    def snapshot(self, out: str | os.PathLike[str]) -> Path:
        """Write a consistent, compacted copy (rows, offsets, markers, stats) to the empty directory ``out``."""
        o = Path(out)
        o.mkdir(mode=0o700, parents=True, exist_ok=True)
        if any(o.iterdir()):
            raise StoreError(f"snapshot target {o} is not empty")
        # Created 0600 before a byte is written (never readable by others, whatever the umask).
        fd = os.open(o / "data.mdb", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.fchmod(fd, 0o600)
            self._env.copyfd(fd, compact=True)
            os.fsync(fd)
        except lmdb.Error as e:
            raise StoreError(f"snapshot of {self.path} to {o} failed: {e}") from e
        finally:
            os.close(fd)
        return o
