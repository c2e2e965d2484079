"""The ``numpy`` cache backend: the set-associative table of ``base`` in host memory.

The table is numpy arrays (keys and one-byte digests per bucket row of 32 ways, as the
``cuda`` backend lays them out; digest 0 marks an empty way); the per-key work runs in the
compiled loops of :mod:`streamhps.cache.host_kernels`, which release the GIL while they run.
Around them, numpy does what is whole-array by nature: choosing one row per key when a call
repeats keys (the highest version, the later row on ties) and putting absent keys in key
order, which decides who is dropped when a bucket runs out of ways.

Thread safety: one gate (:mod:`~streamhps.cache.host_kernels`' ticket lock) guards the table.
A lookup and each piece of a stream writer's batch enter and leave it inside compiled code (a
batch is one call: the writer gives up the GIL once per batch, not once per piece), so neither
holds it while waiting for the GIL; every other operation holds it for its whole length
through ``_lock`` (:class:`GatedLock`: the base class's re-entrant lock, then the gate). The
operation clock and the lookup counters live in an array the gated calls update inside the
gate; sizes and counts in the base class's ``_book``.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from streamhps.cache import host_kernels as hk
from streamhps.cache.base import (
    HOST_GATE_BYTES,
    SLOTS_PER_BUCKET,
    EmbeddingCache,
    buckets_for,
    storage_dtype,
)
from streamhps.errors import CacheError

_EMPTY = np.iinfo(np.int64).min  # key stored in empty slots (occupancy is the digest's)
_B = SLOTS_PER_BUCKET


def _layout(
    nb: int, slots: int, dim: int, dtype: np.dtype[Any]
) -> tuple[dict[str, tuple[tuple[int, ...], Any, int]], int]:
    """(name -> (shape, dtype, byte offset), total bytes) of a table's arrays in one buffer,
    each 64-byte aligned (the gate's words first)."""
    specs: dict[str, tuple[tuple[int, ...], Any]] = {
        "gate": ((hk.GATE_WORDS,), np.int64),
        "ctr": ((hk.COUNTERS,), np.int64),
        "ktab": ((nb, _B), np.int64),
        "dig": ((nb, _B), np.uint8),
        "ver": ((slots,), np.int64),
        "score": ((slots,), np.uint64),
        "stamp": ((slots,), np.uint32),
        "vals": ((slots, dim), dtype),
    }
    out: dict[str, tuple[tuple[int, ...], Any, int]] = {}
    at = 0
    for name, (shape, dt) in specs.items():
        out[name] = (shape, dt, at)
        at += -(-int(np.prod(shape)) * np.dtype(dt).itemsize // 64) * 64
    return out, at


def _table_arrays(
    nb: int, slots: int, dim: int, dtype: np.dtype[Any], memory: Any
) -> dict[str, np.ndarray]:
    """The table's arrays: views into ``memory``, or fresh ones where it is None."""
    layout, total = _layout(nb, slots, dim, dtype)
    if memory is None:  # zeros from the allocator (pages zeroed as they are first touched)
        return {name: np.zeros(shape, dtype=dt) for name, (shape, dt, _) in layout.items()}
    buf = np.frombuffer(memory, dtype=np.uint8)
    if buf.shape[0] < total:
        raise CacheError(
            f"the cache's memory holds {buf.shape[0]} bytes; a table of {slots} slots of dim "
            f"{dim} {dtype.name} needs {total} (NumpyCache.table_bytes)"
        )
    if not buf.flags.writeable:
        raise CacheError("the cache's memory must be writable")
    return {
        name: buf[at : at + int(np.prod(shape)) * np.dtype(dt).itemsize].view(dt).reshape(shape)
        for name, (shape, dt, at) in layout.items()
    }


def _counter(index: int) -> Any:
    """An int attribute kept in ``self._ctr[index]`` (where the gated calls update it)."""

    def get(self: NumpyCache) -> int:
        return int(self._ctr[index])

    def put(self: NumpyCache, v: int) -> None:
        self._ctr[index] = v

    return property(get, put)


class GatedLock:
    """The base class's re-entrant lock, plus the gate while held (first acquire enters it,
    last release leaves it): what every operation but the two gated ones holds. A ``timeout``
    bounds the wait for the re-entrant lock only; the gate is waited for (its holders hold it
    for one compiled call, or one operation)."""

    def __init__(self, gate: np.ndarray) -> None:
        self._rlock = threading.RLock()
        self._gate = gate
        self._depth = 0  # changed only by the thread holding _rlock

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if not self._rlock.acquire(blocking, timeout):
            return False
        if self._depth == 0:
            if blocking:
                hk.gate_enter(self._gate)
            elif not hk.gate_try_enter(self._gate):
                self._rlock.release()
                return False
        self._depth += 1
        return True

    def release(self) -> None:
        self._depth -= 1
        if self._depth == 0:
            hk.gate_leave(self._gate)
        self._rlock.release()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


class NumpyCache(EmbeddingCache):
    backend = "numpy"

    def __init__(
        self,
        capacity: int,
        dim: int,
        dtype: Any = "float32",
        policy: str = "lru",
        *,
        memory: Any = None,
        attach: bool = False,
    ):
        """``memory``: a writable buffer of at least :meth:`table_bytes` bytes to lay the table,
        the gate and the counters out in (memory another process maps too: a table written by
        one process and read by another, :mod:`streamhps.worker.ingest_process`); ``attach``:
        it already holds a table of these parameters (made by another process), leave it as is.
        """
        self._ctr = np.zeros(hk.COUNTERS, dtype=np.int64)  # the base class zeroes its counters
        super().__init__(capacity, dim, dtype, policy)
        arrays = _table_arrays(self.n_buckets, self.capacity, self.dim, self.dtype, memory)
        self._gate, self._ctr = arrays["gate"], arrays["ctr"]  # ctr: clock, looked up, hits
        assert self._gate.nbytes + self._ctr.nbytes == HOST_GATE_BYTES
        self._lock = GatedLock(self._gate)  # type: ignore[assignment]
        self._ktab = arrays["ktab"]  # [buckets, 32] keys
        self._dig = arrays["dig"]  # [buckets, 32] key digest per slot, 0 = empty
        self._ver, self._score, self._stamp = arrays["ver"], arrays["score"], arrays["stamp"]
        self._vals = arrays["vals"]  # [slots, dim]
        if memory is not None and not attach:  # given memory may hold anything: cleared
            for name in ("gate", "ctr", "dig", "ver", "score", "stamp", "vals"):
                arrays[name].fill(0)
        if not attach:
            self._ktab.fill(_EMPTY)
            # Touch every page now: the first write into a fresh page faults (~1 us per 4 KiB),
            # which would otherwise land on the stream's first inserts, on the ingest thread.
            for a in (self._dig, self._ver, self._score, self._stamp, self._vals):
                a.reshape(-1)[:: max(1, 4096 // a.itemsize)] = 0
        hk.warm(self._words.dtype)  # compiled (or loaded) now, not on the first rows

    @staticmethod
    def table_bytes(capacity: int, dim: int, dtype: Any = "float32") -> int:
        """Bytes of the ``memory`` a cache of these parameters lays its table out in."""
        nb = buckets_for(capacity)
        return _layout(nb, nb * SLOTS_PER_BUCKET, int(dim), storage_dtype(dtype))[1]

    #: rows per gate hold of a stream write (the base class's 1 024 was sized for a lock taken
    #: from Python, a GIL hand-over per piece): a lookup waits for one piece at most, ~0.1 ms
    #: here. Pieces run inside one compiled call, so smaller ones cost the writer nothing
    #: measurable (bench/ingest_apply.py on the H200: 345-364 ns/row at 256 vs 388 at 1 024;
    #: lookup p99 beside a writer in another process 0.46-0.48 ms vs 0.71-0.83, idle 0.3-0.5)
    write_piece_rows = 256

    # the clock and lookup counters, kept where the gated calls update them
    _clock = _counter(hk.CLOCK)
    _looked_up = _counter(hk.LOOKED_UP)
    _hits = _counter(hk.HITS)

    # ------------------------------------------------------------------ gated operations
    def lookup(self, keys: Any) -> tuple[np.ndarray, np.ndarray]:
        k = self._keys(keys)
        n = k.shape[0]
        out = np.empty((n, self.dim), dtype=self.dtype)
        hit = np.empty(n, dtype=bool)
        hk.lookup_gated(
            hk.ro(k), self.n_buckets, self._dig_words, self._ktab, self._words, self._score,
            hk.row_words(out), hit, self.policy == "lfu", self._gate, self._ctr,
        )  # fmt: skip
        return out, hit

    lookup.__doc__ = EmbeddingCache.lookup.__doc__

    def upsert_async(self, keys: Any, values: Any, versions: Any, *, insert: bool = True) -> None:
        n = int(np.shape(keys)[0])
        checked = self._checked_batch(keys, values, versions, n)
        if checked is None:  # a batch that repeats keys: upsert, piece by piece
            super().upsert_async(keys, values, versions, insert=insert)
        else:
            self._write_batch(*checked, insert)

    upsert_async.__doc__ = EmbeddingCache.upsert_async.__doc__

    # ------------------------------------------------------------------ helpers
    def _as_array(self, a: Any) -> np.ndarray:
        if hasattr(a, "__cuda_array_interface__"):
            raise CacheError("the numpy cache takes host arrays; got a GPU array (use .get())")
        return np.asarray(a)

    def _contiguous(self, a: Any) -> np.ndarray:
        return np.ascontiguousarray(a)

    @property
    def _words(self) -> np.ndarray:
        """The value table as the kernels copy rows: ``[slots, words]``, a view."""
        return hk.row_words(self._vals)

    @property
    def _dig_words(self) -> np.ndarray:
        """The digests as ``[buckets, 4]`` uint64 words (a view), probed eight ways at once."""
        return self._dig.view(np.uint64)

    def _insert_score(self, clock: int) -> np.uint64:
        """The score an insert by operation ``clock`` starts with (lru: the clock; lfu: one
        lookup, then the clock)."""
        return np.uint64(clock if self.policy == "lru" else (1 << 32) | (clock & 0xFFFFFFFF))

    def _find(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(slot, hit) per key; slot is -1 on a miss."""
        slot = np.empty(keys.shape[0], dtype=np.int64)
        hk.find(hk.ro(keys), self.n_buckets, self._dig_words, self._ktab, slot)
        return slot, slot >= 0

    # ------------------------------------------------------------------ operations
    def _lookup(self, keys: np.ndarray, clock: int) -> tuple[np.ndarray, np.ndarray]:
        n = keys.shape[0]
        out = np.empty((n, self.dim), dtype=self.dtype)
        hit = np.empty(n, dtype=bool)
        self._hits += hk.lookup(
            hk.ro(keys), self.n_buckets, self._dig_words, self._ktab, self._words, self._score,
            hk.row_words(out), hit, clock, self.policy == "lfu",
        )  # fmt: skip
        return out, hit

    def _lookup_pooled(
        self, keys: np.ndarray, offsets: np.ndarray, mode: str, clock: int
    ) -> tuple[np.ndarray, np.ndarray]:
        rows, hit = self._lookup(keys, clock)
        return pool_rows(rows, offsets, mode, self.dtype), hit

    def _get_versions(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        slot, hit = self._find(keys)
        return np.where(hit, self._ver[slot], 0), hit

    def _upsert(
        self, keys: np.ndarray, values: np.ndarray, versions: np.ndarray, clock: int, insert: bool
    ) -> dict[str, int]:
        c = {"inserted_empty": 0, "evictions": 0, "updates": 0, "dropped": 0, "absent": 0}
        n = keys.shape[0]
        if n == 0:
            return c
        now = np.uint32(clock & 0xFFFFFFFF)
        sorted_unique = n < 2 or bool((keys[1:] > keys[:-1]).all())
        by_key = None  # the rows in key order, where unique but not sorted
        if not sorted_unique:
            by_key = np.argsort(keys)
            ks = keys[by_key]
            if bool((ks[1:] == ks[:-1]).any()):
                by_key = None
        group_size = None
        if sorted_unique or by_key is not None:
            # one row per key already (the worker's stream: a piece of a batch without repeats,
            # sorted or in arrival order): rows are written straight from the caller's array
            uk, uv, src = keys, versions, np.arange(n)
        else:
            # one row per distinct key: the highest version (ties: the later row); in key order
            order = np.lexsort((versions, keys))
            ks = keys[order]
            last = np.ones(n, dtype=bool)
            last[:-1] = ks[:-1] != ks[1:]
            src = order[last]
            group_size = np.diff(np.concatenate(([-1], np.flatnonzero(last))))
            uk, uv = keys[src], versions[src]
        uk, uv, src, rows = hk.ro(uk), hk.ro(uv), hk.ro(src), hk.ro(hk.row_words(values))
        miss = np.empty(uk.shape[0], dtype=np.int64)
        updates, n_miss = hk.write_resident(
            uk, uv, src, rows, self.n_buckets, self._dig_words, self._ktab, self._ver, self._stamp,
            self._words, now, miss,
        )  # fmt: skip
        c["updates"] = int(updates)
        miss = miss[:n_miss]
        if not insert:
            c["absent"] = int(n_miss if group_size is None else group_size[miss].sum())
        elif n_miss:
            if by_key is not None:  # the absent rows in key order
                absent = np.zeros(n, dtype=bool)
                absent[miss] = True
                miss = by_key[absent[by_key]]
            empty, evicted, dropped = hk.insert_absent(
                hk.ro(miss), uk, uv, src, rows, self.n_buckets, self._dig, self._dig_words, self._ktab, self._ver,
                self._score, self._stamp, self._words, now, self._insert_score(clock),
            )  # fmt: skip
            c["inserted_empty"], c["evictions"], c["dropped"] = (
                int(empty),
                int(evicted),
                int(dropped),
            )
        return c

    def _checked_batch(
        self, keys: Any, values: Any, versions: Any, n: int
    ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]] | None:
        """A stream writer's batch checked whole (a bad row refuses it before any piece is
        written): (keys, versions, row arrays in the cache's dtype); None when it repeats a key
        (the worker sends one row per key), for ``upsert``'s piece-by-piece path."""
        k = self._check_keys(self._as_array(keys), "keys")
        parts = (
            self._row_parts(values, n)
            if isinstance(values, (list, tuple))
            else [self._as_array(values)]
        )
        for p in parts:
            if p.ndim != 2 or p.shape[1] != self.dim or p.dtype.kind != "f":
                raise CacheError(
                    f"values must be [rows, {self.dim}] floating point arrays for a dim-"
                    f"{self.dim} cache, got {tuple(p.shape)} {p.dtype}"
                )
        if sum(int(p.shape[0]) for p in parts) != n:
            raise CacheError(f"values hold {sum(int(p.shape[0]) for p in parts)} rows for {n} keys")
        ver = self._as_array(versions)
        if ver.ndim != 1 or ver.shape[0] != n or ver.dtype.kind not in "iu":
            raise CacheError(f"versions must be ({n},) integers to match keys, got {ver.shape}")
        ver = np.ascontiguousarray(ver, dtype=np.int64)
        if n and bool((ver <= 0).any()):
            raise CacheError("versions must be > 0; this call was refused and changed nothing")
        ks = np.sort(k)
        if n > 1 and bool((ks[1:] == ks[:-1]).any()):
            return None
        return k, ver, [np.ascontiguousarray(p, dtype=self.dtype) for p in parts]

    def _write_batch(
        self, keys: np.ndarray, versions: np.ndarray, parts: list[np.ndarray], insert: bool
    ) -> None:
        """Distinct ``keys`` in pieces of ``write_piece_rows``, in one compiled call that
        enters the gate per piece (:func:`~streamhps.cache.host_kernels.upsert_batch_gated`)."""
        n, step = keys.shape[0], self.write_piece_rows
        by_key = np.empty(n, dtype=np.int64)  # each piece's rows in key order
        whole = n - n % step
        if whole:
            by_key[:whole] = np.argsort(keys[:whole].reshape(-1, step), axis=1).reshape(-1)
        by_key[whole:] = np.argsort(keys[whole:])
        held = [hk.row_words(p) for p in parts if p.shape[0]]  # alive until the call returns
        addresses = np.array([a.__array_interface__["data"][0] for a in held], dtype=np.int64)
        ends = np.cumsum([a.shape[0] for a in held], dtype=np.int64)
        counts = np.zeros(5, dtype=np.int64)
        hk.upsert_batch_gated(
            hk.ro(keys), hk.ro(versions), hk.ro(by_key), hk.ro(addresses), hk.ro(ends), step,
            self.n_buckets, self._dig, self._dig_words, self._ktab, self._ver, self._score,
            self._stamp, self._words, insert, self.policy == "lfu", self._gate, self._ctr, counts,
        )  # fmt: skip
        updates, absent, empty, evicted, dropped = (int(c) for c in counts)
        c = {"updates": updates, "inserted_empty": empty, "evictions": evicted,
             "dropped": dropped, "absent": 0 if insert else absent}  # fmt: skip
        self._count(c, n)

    def _evict(self, keys: np.ndarray) -> int:
        slot, hit = self._find(np.unique(keys))
        s = slot[hit]
        self._ktab.reshape(-1)[s] = _EMPTY
        self._dig.reshape(-1)[s] = 0
        self._ver[s] = 0
        self._score[s] = 0
        self._stamp[s] = 0
        return int(s.shape[0])

    def _clear(self) -> None:
        self._ktab.fill(_EMPTY)
        self._dig.fill(0)
        self._ver.fill(0)
        self._score.fill(0)
        self._stamp.fill(0)
        self._vals.fill(0)

    def _hits_total(self) -> int:
        return self._hits


def pool_rows(rows: np.ndarray, offsets: np.ndarray, mode: str, dtype: np.dtype) -> np.ndarray:
    """Sum (or mean) of ``rows[offsets[b]:offsets[b + 1]]`` per bag, accumulated in float32;
    empty bags are zeros (as ``embedding_bag``)."""
    n_bags = offsets.shape[0] - 1
    out = np.zeros((n_bags, rows.shape[1]), dtype=np.float32)
    lens = np.diff(offsets)
    full = lens > 0
    if full.any():
        # reduceat over the starts of non-empty bags: each sums up to the next start (empty bags
        # between two starts share it), the last one to the end
        out[full] = np.add.reduceat(rows.astype(np.float32, copy=False), offsets[:-1][full], axis=0)
        if mode == "mean":
            out[full] /= lens[full, None].astype(np.float32)
    return out.astype(dtype, copy=False)
