"""The embedding-cache interface shared by the ``numpy`` and ``cuda`` backends.

Layout (both backends, so that eviction behaves the same on both): a set-associative table of
``capacity / SLOTS_PER_BUCKET`` buckets of 32 slots each (HugeCTR/HKV style). A key's bucket
comes from a splitmix64 hash of the key (``bucket_of``); a key lives in one slot of its
bucket or nowhere. Each slot holds the key, its row, its version, its eviction score and the
id of the last operation that wrote it.

Semantics every backend implements (the shared test suite in ``tests/cache`` proves them):

* ``lookup`` returns rows and a hit mask; missed rows are zeros. Duplicate keys inside one
  lookup read the same row and count once towards LFU frequency.
* ``upsert`` applies a row only if its version is newer than the resident one (a version never
  goes back); duplicate keys inside one call: the highest version wins. Absent keys are
  inserted: into an empty slot of their bucket, else over the eligible slot with the lowest
  ``(score, key)``. A slot written earlier in the same call is never evicted by that call; if a
  bucket runs out of eligible slots inside one call the extra rows are dropped and counted.
* ``lookup_pooled`` (multi-hot): bag ``b`` is the sum, or the mean over the bag's length, of
  the resident rows of ``keys[offsets[b]:offsets[b + 1]]`` (``torch.nn.functional.embedding_bag``
  on the resident rows; missed keys add nothing, an empty bag is zeros), with a hit mask per
  key; scores refresh as in ``lookup``.
* Scores: ``lru`` = the operation clock of the last insert or lookup hit; ``lfu`` =
  ``(lookup count << 32) | clock`` (frequency, ties broken by recency). Updates of resident rows
  do not change the score: the stream refreshing a row does not make it hot.
"""

from __future__ import annotations

import abc
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from streamhps.errors import CacheError
from streamhps.wire import DTYPES as WIRE_DTYPES

SLOTS_PER_BUCKET = 32
POLICIES = ("lru", "lfu")
POOLING = ("sum", "mean")
DTYPES = {name: np.dtype(name) for name in WIRE_DTYPES}  # what the wire carries

_C1 = np.uint64(0xBF58476D1CE4E5B9)
_C2 = np.uint64(0x94D049BB133111EB)
_LOW32 = np.uint64(0xFFFFFFFF)

# bytes per slot besides the row: key 8, version 8, score 8, last-write op 4, occupancy/digest 1
SLOT_OVERHEAD_BYTES = 29


def buckets_for(rows: int) -> int:
    """Number of buckets for a requested capacity (capacity rounds up to whole buckets)."""
    return max(1, -(-int(rows) // SLOTS_PER_BUCKET))


def storage_dtype(dtype: Any) -> np.dtype[Any]:
    """The numpy dtype for a cache dtype name or dtype; CacheError for anything else."""
    try:
        dt = np.dtype(dtype)
    except TypeError as e:
        raise CacheError(f"cache dtype {dtype!r} is not a dtype; use 'float32' or 'float16'") from e
    if dt.name not in DTYPES:
        raise CacheError(f"cache dtype {dt.name!r} is not supported; use 'float32' or 'float16'")
    return dt


def memory_estimate(rows: int, dim: int, dtype: Any = "float32", backend: str = "cuda") -> int:
    """Bytes a cache of ``rows`` rows of ``dim`` values will allocate (device memory for
    ``cuda``, host memory for ``numpy``), before allocating anything."""
    if backend not in ("numpy", "cuda"):
        raise CacheError(f"unknown cache backend {backend!r}; use 'numpy' or 'cuda'")
    if int(rows) < 1 or int(dim) < 1:
        raise CacheError(f"cache needs rows >= 1 and dim >= 1, got rows={rows}, dim={dim}")
    nb = buckets_for(rows)
    slots = nb * SLOTS_PER_BUCKET
    row_bytes = int(dim) * storage_dtype(dtype).itemsize
    total = slots * (row_bytes + SLOT_OVERHEAD_BYTES)
    if backend == "cuda":
        total += nb * 4 + 64  # a spin lock per bucket, the device counters
    else:
        total += HOST_GATE_BYTES
    return total


#: the numpy backend's gate and the counters its gated calls keep (host_kernels.GATE_WORDS +
#: host_kernels.COUNTERS int64 words)
HOST_GATE_BYTES = (16 + 4) * 8


def hash_keys(keys: np.ndarray, n_buckets: int) -> tuple[np.ndarray, np.ndarray]:
    """(bucket, digest) per key: splitmix64 of the key bits; the CUDA kernels compute the same.

    bucket = ((h & 0xffffffff) * n_buckets) >> 32; digest = h >> 56, with 0 mapped to 1 (a zero
    digest marks an empty slot on the GPU).
    """
    h = keys.view(np.uint64).copy()
    h ^= h >> np.uint64(30)
    h *= _C1
    h ^= h >> np.uint64(27)
    h *= _C2
    h ^= h >> np.uint64(31)
    bucket = ((h & _LOW32) * np.uint64(n_buckets)) >> np.uint64(32)
    digest = (h >> np.uint64(56)).astype(np.uint8)
    digest[digest == 0] = 1
    return bucket.astype(np.int64), digest


class EmbeddingCache(abc.ABC):
    """A fixed-capacity cache of embedding rows keyed by int64, with a version per row.

    Thread safety: every public operation runs under one lock, so a lookup never observes a
    row half-written by a concurrent upsert (the CUDA backend also orders all its kernels on
    one stream). Backends implement the ``_``-prefixed methods on validated arrays.
    """

    backend: str = ""

    def __init__(self, capacity: int, dim: int, dtype: Any = "float32", policy: str = "lru"):
        if int(capacity) < 1:
            raise CacheError(f"cache capacity must be >= 1 row, got {capacity}")
        if int(dim) < 1:
            raise CacheError(f"cache dim must be >= 1, got {dim}")
        if policy not in POLICIES:
            raise CacheError(f"cache policy {policy!r} is unknown; use 'lru' or 'lfu'")
        self.n_buckets = buckets_for(capacity)
        self.capacity = self.n_buckets * SLOTS_PER_BUCKET
        self.dim = int(dim)
        self.dtype = storage_dtype(dtype)
        self.policy = policy
        self._lock = threading.RLock()
        self._book = threading.Lock()  # size and counts (a backend may write without _lock)
        self._reader_waiting = False  # set by a reader that found the lock taken (_reading)
        self._writer_returning = False  # a stream writer yielded to readers, takes the lock back
        self._clock = 0  # operation counter: LRU time, LFU recency, "written by this call"
        self._size = 0
        self._looked_up = 0  # lookup positions served; misses = this - hits
        self._counts = dict.fromkeys(
            (
                "inserts",
                "updates",
                "evictions",
                "stale_rejected",
                "dropped",
                "removed",
            ),
            0,
        )

    memory_estimate = staticmethod(memory_estimate)

    @contextlib.contextmanager
    def _reading(self) -> Iterator[None]:
        """The lock, for a reader: one that finds it taken says so, and a stream writer between
        two pieces (:meth:`upsert_async`) then lets it in first; readers that come while that
        writer takes the lock back let it have it (readers in a tight loop starved the writer:
        a 200-piece write took 40x longer)."""
        if self._writer_returning:
            time.sleep(0)  # a stream writer let the waiting readers in: its piece comes first
        if not self._lock.acquire(blocking=False):
            self._reader_waiting = True
            self._lock.acquire()
        try:
            yield
        finally:
            self._lock.release()

    # ----------------------------------------------------------------- public API
    def lookup(self, keys: Any) -> tuple[Any, Any]:
        """(values [n, dim], hit [n] bool) for ``keys``; missed rows are zeros. Hits refresh
        their eviction score."""
        with self._reading():
            k = self._keys(keys)
            self._count_looked_up(int(k.shape[0]))
            return self._lookup(k, self._tick())

    def lookup_pooled(self, keys: Any, offsets: Any, mode: str = "sum") -> tuple[Any, Any]:
        """(pooled [n_bags, dim], hit [len(keys)] bool): bag ``b`` pools the resident rows of
        ``keys[offsets[b]:offsets[b + 1]]`` by ``mode`` ("sum" or "mean", the mean over the
        whole bag's length); ``offsets`` has ``n_bags + 1`` entries, from 0 to ``len(keys)``."""
        if mode not in POOLING:
            raise CacheError(f"pooling mode {mode!r} is unknown; use 'sum' or 'mean'")
        with self._reading():
            k = self._keys(keys)
            o = self._check_offsets(self._as_array(offsets), int(k.shape[0]))
            self._count_looked_up(int(k.shape[0]))
            return self._lookup_pooled(k, o, mode, self._tick())

    def get_versions(self, keys: Any) -> tuple[Any, Any]:
        """(versions [n] int64, 0 on a miss; hit [n] bool), without touching eviction scores."""
        with self._reading():
            return self._get_versions(self._keys(keys))

    def upsert(self, keys: Any, values: Any, versions: Any) -> int:
        """Apply rows newer than the resident version, inserting absent keys (evicting by score
        when the bucket is full). Returns how many distinct keys changed."""
        with self._lock:
            k, v, ver = self._rows(keys, values, versions)
            return self._count(self._upsert(k, v, ver, self._tick(), insert=True), len(k))

    def update_if_present(self, keys: Any, values: Any, versions: Any) -> int:
        """Like ``upsert`` but never inserts: absent keys are ignored. Returns keys changed."""
        with self._lock:
            k, v, ver = self._rows(keys, values, versions)
            return self._count(self._upsert(k, v, ver, self._tick(), insert=False), len(k))

    def upsert_async(self, keys: Any, values: Any, versions: Any, *, insert: bool = True) -> None:
        """``upsert`` (``update_if_present`` with ``insert=False``) without a count, for a writer
        that streams rows in (the worker's ingest thread). ``values`` may also be a list of
        ``[rows, dim]`` arrays, stacked in order, that together hold one row per key (the
        decoded messages of a batch, given without stacking them on the host). A backend may
        return before the rows are written (cuda: staged, overlapping the next batch's copy
        with this one's kernels); every operation issued on this cache after the return sees
        them. Here: in pieces of ``write_piece_rows``, so the lock is free for lookups between
        pieces; a piece's rows are a view of one array of the list where they lie in one (the
        batch is never stacked whole: tens of MB of fresh pages per apply)."""
        n = int(np.shape(keys)[0])
        self._write_pieces(self._piece_writer(keys, values, versions, n, insert), n)

    def _write_pieces(self, write: Callable[[int, int], Any], n: int) -> None:
        """``write(lo, hi)`` for each piece of ``write_piece_rows`` rows, each under the lock,
        fair to the readers waiting for it."""
        step = self.write_piece_rows
        for lo in range(0, n, step) if n > step else [0]:
            if lo and self._reader_waiting:
                # Python locks are not fair: released and taken again at once, the lock stayed
                # with this writer for every piece while a lookup waited. Yield to the readers
                # waiting now (a sleep lasts the timer slack, ~50-80 us, so only then), and
                # have the ones that come after wait for this writer's next piece.
                self._reader_waiting = False
                self._writer_returning = True
                time.sleep(0)
            with self._lock:
                self._writer_returning = False
                write(lo, min(lo + step, n))

    def _piece_writer(
        self, keys: Any, values: Any, versions: Any, n: int, insert: bool
    ) -> Callable[[int, int], Any]:
        """For :meth:`upsert_async`: a function writing rows ``lo:hi`` (called with the lock
        held). Here: ``upsert``/``update_if_present`` of each piece, which checks it; a backend
        may check the whole batch once instead."""
        parts = self._row_parts(values, n) if isinstance(values, (list, tuple)) else None
        write = self.upsert if insert else self.update_if_present

        def piece(lo: int, hi: int) -> Any:
            rows = values[lo:hi] if parts is None else rows_between(parts, lo, hi)
            return write(keys[lo:hi], rows, versions[lo:hi])

        return piece

    def _row_parts(self, values: list[Any] | tuple[Any, ...], n: int) -> list[Any]:
        parts = [self._as_array(v) for v in values]
        for v in parts:
            if v.ndim != 2 or v.shape[1] != self.dim:
                raise CacheError(
                    f"values must be [rows, {self.dim}] arrays for a dim-{self.dim} cache, got "
                    f"{tuple(v.shape)}"
                )
        check_row_count(parts, n)
        return parts or [np.zeros((0, self.dim), dtype=self.dtype)]

    #: rows per lock hold in :meth:`upsert_async` (a lookup waits at most for one piece: ~0.3 ms
    #: of the numpy backend's compiled writer; ``bench/ingest_apply.py --piece-rows``)
    write_piece_rows = 1024
    #: True when writing rows with repeated keys, unsorted, costs no more than writing one row
    #: per key (cuda: the kernels resolve repeats on the device), so a writer need not reduce a
    #: batch to one row per key on the host first
    resolves_duplicates = False

    def evict(self, keys: Any) -> int:
        """Remove ``keys``; returns how many distinct keys were present."""
        with self._lock:
            removed = int(self._evict(self._keys(keys)))
            with self._book:
                self._size -= removed
                self._counts["removed"] += removed
            return removed

    def clear(self) -> None:
        """Drop every row (statistics other than size are kept)."""
        with self._lock:
            self._clear()
            with self._book:
                self._size = 0

    def __len__(self) -> int:
        return self._size

    def stats(self) -> dict[str, Any]:
        """Counters since creation: hits/misses count lookup positions, inserts/updates/
        evictions count rows, stale_rejected counts input rows not applied (older or equal
        version, or superseded by a newer duplicate), dropped counts inserts that found no
        evictable slot in their bucket within one call."""
        with self._lock:
            out: dict[str, Any] = {
                "backend": self.backend,
                "capacity": self.capacity,
                "size": self._size,
                "dim": self.dim,
                "dtype": self.dtype.name,
                "policy": self.policy,
                "memory_bytes": self.memory_bytes,
            }
            hits = self._hits_total()
            out["hits"] = hits
            out["misses"] = self._looked_up - hits
            out.update(self._counts)
            return out

    @property
    def memory_bytes(self) -> int:
        return memory_estimate(self.capacity, self.dim, self.dtype, self.backend)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(capacity={self.capacity}, dim={self.dim}, "
            f"dtype={self.dtype.name}, policy={self.policy!r}, size={self._size})"
        )

    # ----------------------------------------------------------------- for backends
    def _tick(self) -> int:
        """The next operation clock (lock held)."""
        self._clock += 1
        return self._clock

    def _count_looked_up(self, n: int) -> None:
        """``n`` more lookup positions served (lock held)."""
        self._looked_up += n

    def _count(self, c: dict[str, int], n_rows: int) -> int:
        inserted = c["inserted_empty"] + c["evictions"]
        applied = inserted + c["updates"]
        with self._book:
            self._size += c["inserted_empty"]
            self._counts["inserts"] += inserted
            self._counts["updates"] += c["updates"]
            self._counts["evictions"] += c["evictions"]
            self._counts["dropped"] += c["dropped"]
            self._counts["stale_rejected"] += n_rows - applied - c["dropped"] - c["absent"]
        return applied

    @abc.abstractmethod
    def _hits_total(self) -> int:
        """Lookup positions that hit, since creation."""

    def _keys(self, keys: Any) -> Any:
        return self._check_keys(self._as_array(keys), "keys")

    def _rows(self, keys: Any, values: Any, versions: Any) -> tuple[Any, Any, Any]:
        k = self._check_keys(self._as_array(keys), "keys")
        v = self._as_array(values)
        ver = self._as_array(versions)
        n = k.shape[0]
        if v.ndim != 2 or v.shape != (n, self.dim):
            raise CacheError(
                f"values must have shape ({n}, {self.dim}) for {n} keys of a dim-{self.dim} "
                f"cache, got {tuple(v.shape)}"
            )
        if v.dtype.kind != "f":
            raise CacheError(f"values must be floating point, got dtype {v.dtype}")
        if ver.ndim != 1 or ver.shape[0] != n:
            raise CacheError(f"versions must have shape ({n},) to match keys, got {ver.shape}")
        if ver.dtype.kind not in "iu":
            raise CacheError(f"versions must be integers (int64), got dtype {ver.dtype}")
        ver = ver.astype(np.int64, copy=False)
        if n and bool((ver <= 0).any()):
            raise CacheError("versions must be > 0; this call was refused and changed nothing")
        return k, self._contiguous(v.astype(self.dtype, copy=False)), self._contiguous(ver)

    def _check_offsets(self, o: Any, n_keys: int) -> Any:
        if o.ndim != 1 or o.shape[0] < 1 or o.dtype.kind not in "iu":
            raise CacheError(
                f"offsets must be a 1-D integer array of n_bags + 1 entries, got shape "
                f"{tuple(o.shape)} dtype {o.dtype}"
            )
        o = self._contiguous(o.astype(np.int64, copy=False))
        if int(o[0]) != 0 or int(o[-1]) != n_keys or bool((o[1:] < o[:-1]).any()):
            raise CacheError(
                f"offsets must rise from 0 to the number of keys ({n_keys}) without going back"
            )
        return o

    def _check_keys(self, k: Any, what: str) -> Any:
        if k.ndim != 1:
            raise CacheError(f"{what} must be a 1-D array of int64, got shape {tuple(k.shape)}")
        if k.dtype.kind not in "iu":
            raise CacheError(f"{what} must be integers (int64), got dtype {k.dtype}")
        if k.dtype.itemsize == 8:
            return self._contiguous(k).view(np.int64)  # uint64 ids keep their bits
        return self._contiguous(k.astype(np.int64))

    @abc.abstractmethod
    def _as_array(self, a: Any) -> Any: ...

    @abc.abstractmethod
    def _contiguous(self, a: Any) -> Any: ...

    @abc.abstractmethod
    def _lookup(self, keys: Any, clock: int) -> tuple[Any, Any]: ...

    @abc.abstractmethod
    def _lookup_pooled(self, keys: Any, offsets: Any, mode: str, clock: int) -> tuple[Any, Any]: ...

    @abc.abstractmethod
    def _get_versions(self, keys: Any) -> tuple[Any, Any]: ...

    @abc.abstractmethod
    def _upsert(
        self, keys: Any, values: Any, versions: Any, clock: int, insert: bool
    ) -> dict[str, int]:
        """Returns counts: inserted_empty, evictions, updates, dropped, absent (input rows whose
        key was absent and not inserted: update_if_present only)."""

    @abc.abstractmethod
    def _evict(self, keys: Any) -> int: ...

    @abc.abstractmethod
    def _clear(self) -> None: ...


def row_pieces(parts: list[Any], lo: int, hi: int) -> list[Any]:
    """Rows ``lo:hi`` of the arrays ``parts`` stacked in order, as views of the arrays."""
    pieces, at = [], 0
    for a in parts:
        m = int(a.shape[0])
        if at < hi and at + m > lo:
            pieces.append(a[max(lo - at, 0) : min(hi - at, m)])
        at += m
    return pieces


def check_row_count(parts: list[Any], n: int) -> None:
    """CacheError unless the row arrays ``parts`` hold one row per key of ``n`` keys."""
    rows = sum(int(v.shape[0]) for v in parts)
    if rows != n:
        raise CacheError(f"values hold {rows} rows for {n} keys; give one row per key")


def host_stream_write(
    keys: Any, values: Any, versions: Any, dim: int
) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """A stream write of host (numpy) arrays checked whole before any of it is written:
    ``(keys as int64, the row arrays, versions)``; ``values`` one ``[n, dim]`` array or several
    stacked in order (a worker's messages). CacheError names what is wrong."""
    k = np.ascontiguousarray(keys)
    if k.ndim != 1 or k.dtype.kind not in "iu":
        raise CacheError(f"keys must be a 1-D array of int64, got {k.shape} {k.dtype}")
    if k.dtype != np.int64:
        k = k.astype(np.int64)
    n = int(k.shape[0])
    parts = (
        [np.asarray(v) for v in values]
        if isinstance(values, (list, tuple))
        else [np.asarray(values)]
    )
    for v in parts:
        if v.ndim != 2 or v.shape[1] != dim or v.dtype.kind != "f":
            raise CacheError(
                f"values must have shape ({n}, {dim}) of floats for {n} keys, got "
                f"{tuple(v.shape)} {v.dtype}"
            )
    check_row_count(parts, n)
    ver = np.asarray(versions)
    if ver.ndim != 1 or ver.shape[0] != n or ver.dtype.kind not in "iu":
        raise CacheError(f"versions must be ({n},) integers to match keys, got {ver.shape}")
    if n and bool((ver <= 0).any()):
        raise CacheError("versions must be > 0; this call was refused and changed nothing")
    return k, parts, ver


def packed_bytes(n: int, row_bytes: int) -> int:
    """Bytes of ``n`` rows packed by :func:`pack_rows` (rows of ``row_bytes`` each)."""
    return n * (16 + row_bytes)


def pack_rows(
    buf: np.ndarray, keys: np.ndarray, parts: list[Any], versions: np.ndarray, dtype: np.dtype[Any]
) -> int:
    """Pack ``n`` keys, versions and rows (the arrays ``parts`` stacked in order, converted to
    ``dtype``) into the bytes ``buf``: ``keys (int64) | versions (int64) | rows``, rows
    contiguous and 16-byte aligned where ``buf`` is. One layout for one host -> device copy:
    the cuda cache's staging buffers and an ingest process's relayed writes
    (:func:`unpack_rows`). Returns the bytes written."""
    n = int(keys.shape[0])
    dim = int(parts[0].shape[1]) if parts else 0
    _, rows, _ = unpack_rows(buf, n, dim, dtype)
    buf[: 8 * n].view(np.int64)[:] = keys
    buf[8 * n : 16 * n].view(np.int64)[:] = versions
    at = 0
    for part in parts:
        rows[at : at + part.shape[0]] = part
        at += part.shape[0]
    return packed_bytes(n, dim * dtype.itemsize)


def unpack_rows(
    buf: np.ndarray, n: int, dim: int, dtype: np.dtype[Any]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Views of ``(keys, rows, versions)`` packed by :func:`pack_rows` into ``buf``."""
    rb = dim * dtype.itemsize
    keys = buf[: 8 * n].view(np.int64)
    versions = buf[8 * n : 16 * n].view(np.int64)
    rows = buf[16 * n : n * (16 + rb)].view(dtype).reshape(n, dim)
    return keys, rows, versions


def rows_between(parts: list[Any], lo: int, hi: int) -> Any:
    """Rows ``lo:hi`` of ``parts`` stacked in order: a view where they lie in one array."""
    pieces = row_pieces(parts, lo, hi)
    if len(pieces) == 1:
        return pieces[0]
    return parts[0][:0] if not pieces else np.concatenate(pieces)
