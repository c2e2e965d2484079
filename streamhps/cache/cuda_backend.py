"""The ``cuda`` cache backend: the set-associative table of ``base`` in GPU memory.

CuPy raw kernels (``kernels.cu``): a fused probe + gather lookup (8 to 32 lanes per key,
16-byte loads where the row allows), and upsert as two launches (rows of resident keys, then
inserts of absent ones) under per-bucket spin locks, so duplicate keys and competing inserts
inside one call are safe.

Consistency: every operation is enqueued on one CUDA stream (``cache.stream``), so a lookup
kernel never runs beside an upsert kernel and never sees a half-written row. The base class's
lock serialises the host side of every operation but the request path's lookups
(:meth:`lookup_into`, :meth:`pooled_into`): they take their clock from a counter that needs no
lock and enqueue without it, so a stream writer that holds the lock while it waits for the GIL
does not hold them up (``bench/staleness.py --lookup-breakdown``: lookups waited up to 1.2 ms
p99 for it). The caller's current stream is ordered with the cache's stream by events on
entry and exit, so arrays passed in and returned need no extra synchronisation. ``lookup``
does not synchronise the host; ``upsert``/``update_if_present``/``evict`` do (they return
counts).

``device``/``stream`` (keywords): the GPU the cache lives on (default: the current one) and a
stream to enqueue on instead of a private one: the caches of one worker share one stream, so a
request's lookups of every table are ordered with each other and with every upsert without
cross-stream events (:meth:`lookup_into`, the worker's request path). Pooled (multi-hot)
lookups run the fused kernel of ``serving.cu``.

Stream writes (:meth:`upsert_async`, the worker's ingest path): rows are copied into one of two
reused pinned host buffers, sent by one ``cudaMemcpyAsync`` on a copy stream of their own, and
applied by the same two kernels on the cache's stream once the copy's event fires, in pieces
of ``write_piece_rows`` rows, each enqueued once the last one ran (the host waits without the
lock): a lookup enqueued during a large write waits for one piece's kernels, not the write's.
The call returns as soon as the last piece is enqueued, so the copy of the next batch overlaps
the kernels of this one. :meth:`write_packed` takes rows already packed in page-locked memory
(an ingest process's relayed writes). The cache's lock is held only while enqueuing. Counters of these writes reach ``stats()``/``len()`` at their
next call (which synchronises).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from streamhps.cache.base import (
    EmbeddingCache,
    host_stream_write,
    pack_rows,
    packed_bytes,
    row_pieces,
)
from streamhps.errors import CacheError

log = logging.getLogger(__name__)

_VEC_TYPES = {16: "uint4", 8: "uint2", 4: "unsigned int", 2: "unsigned short"}
_BLOCK = 256
#: Rows per staged write; a larger call is sent in pieces of this size. Two buffers of this
#: many rows are pinned per cache (2 x 64k x 272 bytes = 36 MB at dim 64 fp32).
STAGE_ROWS = 1 << 16


def import_cupy() -> Any:
    """CuPy, or a CacheError that says how to get it."""
    try:
        import cupy
    except ImportError as e:
        raise CacheError(
            "the 'cuda' cache backend needs CuPy and a CUDA GPU (pip install 'streamhps[gpu]')"
        ) from e
    return cupy


@cache
def _module(vec_type: str, nvec: int, kpw: int) -> Any:
    cp = import_cupy()
    src = (Path(__file__).parent / "kernels.cu").read_text()
    opts = ("--std=c++17", f"-DVEC_T={vec_type}", f"-DNVEC={nvec}", f"-DKPW={kpw}")
    return cp.RawModule(code=src, options=opts)


@cache
def _serving_module(vec_type: str, nvec: int, elem: str) -> Any:
    cp = import_cupy()
    src = (Path(__file__).parent / "serving.cu").read_text()
    opts = ("--std=c++17", f"-DVEC_T={vec_type}", f"-DNVEC={nvec}", f"-DELEM_T={elem}")
    return cp.RawModule(code=src, options=opts)


def _signed32(x: int) -> np.int32:
    x &= 0xFFFFFFFF
    return np.int32(x - (1 << 32) if x >= (1 << 31) else x)


class CudaCache(EmbeddingCache):
    backend = "cuda"

    def __init__(
        self,
        capacity: int,
        dim: int,
        dtype: Any = "float32",
        policy: str = "lru",
        *,
        device: int | None = None,
        stream: Any = None,
    ):
        super().__init__(capacity, dim, dtype, policy)
        self._ticks = itertools.count(1)  # the operation clock (_tick)
        cp = self._cp = import_cupy()
        self.device = cp.cuda.Device(device)
        with self.device:
            self._setup(cp, stream)

    def _setup(self, cp: Any, stream: Any) -> None:
        dim = self.dim
        row_bytes = self.dim * self.dtype.itemsize
        self._vec = next(v for v in (16, 8, 4, 2) if row_bytes % v == 0)
        self._nvec = row_bytes // self._vec
        # keys per warp in the fused lookup: more for short rows, so loads stay in flight
        self._kpw = 16 if self._nvec <= 8 else 8
        mod = _module(_VEC_TYPES[self._vec], self._nvec, self._kpw)
        self._k = {
            name: mod.get_function(name)
            for name in (
                "cache_lookup",
                "cache_find",
                "cache_apply",
                "cache_insert",
                "cache_remove",
            )
        }
        self.stream = stream if stream is not None else cp.cuda.Stream(non_blocking=False)
        self._serving: dict[str, Any] = {}  # kernels of serving.cu, compiled on first use
        slots, nb = self.capacity, self.n_buckets
        with self.stream:
            self._digests = cp.zeros(slots, dtype=cp.uint8)
            self._meta = cp.zeros(2 * slots, dtype=cp.int64)  # key, score interleaved
            self._ver = cp.zeros(slots, dtype=cp.int64)
            self._stamp = cp.zeros(slots, dtype=cp.int32)
            self._vals = cp.zeros((slots, self.dim), dtype=self.dtype)
            self._locks = cp.zeros(nb, dtype=cp.int32)
            self._counters = cp.zeros(8, dtype=cp.uint64)
        self.stream.synchronize()
        self._stage_setup(cp)
        self._warm_up()
        log.info(
            "cuda cache: %d slots x dim %d %s, %d bytes", slots, dim, self.dtype, self.memory_bytes
        )

    def _warm_up(self) -> None:
        """Run every operation once on two throw-away rows, then forget them and the counters.

        CuPy compiles its own element-wise, sort and reduction kernels on first use, which takes
        seconds; done here, that happens before a worker reports ready, not on its ingest thread
        while it is supposed to be keeping up with the stream.
        """
        keys = np.array([1, 2], dtype=np.int64)
        vals = np.zeros((2, self.dim), dtype=self.dtype)
        vers = np.array([1, 1], dtype=np.int64)
        self.upsert(keys, vals, vers)
        self.update_if_present(keys, vals, vers + 1)
        self.upsert_async(keys, vals, vers + 2)
        self.upsert_async(keys, vals, vers + 3, insert=False)
        self.lookup(keys)
        self.get_versions(keys)
        self.evict(keys[:1])
        self.clear()
        with self._lock, self._on_stream():
            self._fold_pending()
            for k in self.apply_profile:
                self.apply_profile[k] = 0.0
            self._counters.fill(0)
            self._looked_up = 0
            self._counts = dict.fromkeys(self._counts, 0)
        self.stream.synchronize()

    # ------------------------------------------------------------------ helpers
    @contextlib.contextmanager
    def _on_stream(self) -> Iterator[None]:
        cp = self._cp
        with self.device:
            caller = cp.cuda.get_current_stream()
            if caller != self.stream:
                self.stream.wait_event(caller.record())
            with self.stream:
                yield
            if caller != self.stream:
                caller.wait_event(self.stream.record())

    def _tick(self) -> int:
        """The next operation clock, without the lock (``next`` of an ``itertools.count`` is
        atomic under the GIL): what the request path's lookups stamp their hits with."""
        return next(self._ticks)

    def _count_looked_up(self, n: int) -> None:
        with self._book:  # the request path counts without the lock
            self._looked_up += n

    def _as_array(self, a: Any) -> Any:
        cp = self._cp
        if isinstance(a, cp.ndarray):
            return a
        if hasattr(a, "__cuda_array_interface__"):
            return cp.asarray(a)
        return cp.asarray(np.asarray(a))

    def _contiguous(self, a: Any) -> Any:
        return self._cp.ascontiguousarray(a)

    def _grid(self, n: int, lanes: int) -> tuple[int]:
        return (-(-n * lanes // _BLOCK),)

    # ------------------------------------------------------------------ operations
    def lookup(self, keys: Any) -> tuple[Any, Any]:
        with self._lock, self._on_stream():
            return super().lookup(keys)

    def get_versions(self, keys: Any) -> tuple[Any, Any]:
        with self._lock, self._on_stream():
            return super().get_versions(keys)

    def upsert(self, keys: Any, values: Any, versions: Any) -> int:
        with self._lock, self._on_stream():
            return super().upsert(keys, values, versions)

    def update_if_present(self, keys: Any, values: Any, versions: Any) -> int:
        with self._lock, self._on_stream():
            return super().update_if_present(keys, values, versions)

    def evict(self, keys: Any) -> int:
        with self._lock, self._on_stream():
            return super().evict(keys)

    def clear(self) -> None:
        with self._lock, self._on_stream():
            self._fold_pending()
            super().clear()

    def stats(self) -> dict[str, Any]:
        with self._lock, self._on_stream():
            self._fold_pending()
            return super().stats()

    def __len__(self) -> int:
        with self._lock, self._on_stream():
            self._fold_pending()
            return self._size

    def lookup_pooled(self, keys: Any, offsets: Any, mode: str = "sum") -> tuple[Any, Any]:
        with self._lock, self._on_stream():
            return super().lookup_pooled(keys, offsets, mode)

    def lookup_into(self, keys: Any, out: Any, hit: Any) -> None:
        """The fused lookup of ``keys`` (device int64, contiguous, already validated) into
        ``out`` ``[n, dim]`` and ``hit`` ``[n]``, enqueued on :attr:`stream` without
        synchronising or ordering with the caller's stream: the caller runs on this stream (the
        worker's request path, which validated the keys and owns the ordering)."""
        with self.stream:
            self._count_looked_up(int(keys.shape[0]))
            self._launch_lookup(keys, out, hit, self._tick())

    def pooled_into(
        self, keys: Any, offsets: Any, mode: str, out: Any, hit: Any, misses: Any
    ) -> None:
        """The fused pooled lookup (``serving.cu``): bag ``b`` of ``out`` is the sum (or mean)
        of the resident rows of ``keys[offsets[b]:offsets[b + 1]]``, each row read once; missed
        keys add nothing, have ``hit`` False and are counted into ``misses[0]`` (uint32). The
        mean divides by the whole bag's length, so a caller adds missed rows / length later.
        Inputs validated by the caller; enqueued on :attr:`stream` like :meth:`lookup_into`."""
        with self.stream:
            self._count_looked_up(int(keys.shape[0]))
            self._launch_pooled(keys, offsets, mode, out, hit, misses, self._tick())

    def _launch_pooled(
        self, keys: Any, offsets: Any, mode: str, out: Any, hit: Any, misses: Any, clock: int
    ) -> None:
        n_bags = int(offsets.shape[0]) - 1
        if n_bags <= 0:
            return
        self._serving_kernels()["cache_pooled"](
            (-(-n_bags * 32 // _BLOCK),),
            (_BLOCK,),
            (
                keys, offsets, np.int64(n_bags), self._digests, self._meta, self._vals, out, hit,
                np.uint64(self.n_buckets), np.uint64(clock), np.int32(self.policy == "lfu"),
                np.int32(mode == "mean"), self._counters, misses,
            ),
        )  # fmt: skip

    def _serving_kernels(self) -> dict[str, Any]:
        if not self._serving:
            mod = _serving_module(
                _VEC_TYPES[self._vec],
                self._nvec,
                "unsigned short" if self.dtype.itemsize == 2 else "float",
            )
            self._serving = {n: mod.get_function(n) for n in ("cache_pooled", "segment_misses")}
        return self._serving

    def segment_misses(self, hit: Any, seg_end: Any, counts: Any) -> None:
        """``counts[t]`` (uint32) = misses in ``hit[seg_end[t-1]:seg_end[t]]``: one launch for
        every table of a request (their hit masks side by side in one array)."""
        t = int(seg_end.shape[0])
        if t:
            with self.stream:
                self._serving_kernels()["segment_misses"](
                    (t,), (_BLOCK,), (hit, seg_end, np.int32(t), counts)
                )

    def _lookup_pooled(self, keys: Any, offsets: Any, mode: str, clock: int) -> tuple[Any, Any]:
        cp = self._cp
        out = cp.empty((int(offsets.shape[0]) - 1, self.dim), dtype=self.dtype)
        hit = cp.empty(int(keys.shape[0]), dtype=cp.bool_)
        misses = cp.zeros(1, dtype=cp.uint32)
        self._launch_pooled(keys, offsets, mode, out, hit, misses, clock)
        return out, hit

    def _lookup(self, keys: Any, clock: int) -> tuple[Any, Any]:
        cp = self._cp
        n = int(keys.shape[0])
        out = cp.empty((n, self.dim), dtype=self.dtype)
        hit = cp.empty(n, dtype=cp.bool_)
        self._launch_lookup(keys, out, hit, clock)
        return out, hit

    def _launch_lookup(self, keys: Any, out: Any, hit: Any, clock: int) -> None:
        n = int(keys.shape[0])
        if n:
            warps = -(-n // self._kpw)
            self._k["cache_lookup"](
                (-(-warps * 32 // _BLOCK),),
                (_BLOCK,),
                (
                    keys,
                    np.int64(n),
                    self._digests,
                    self._meta,
                    self._vals,
                    out,
                    hit,
                    np.uint64(self.n_buckets),
                    np.int32(self._nvec),
                    np.uint64(clock),
                    np.int32(self.policy == "lfu"),
                    self._counters,
                ),
            )

    def _find(self, keys: Any) -> Any:
        n = int(keys.shape[0])
        slot = self._cp.empty(n, dtype=self._cp.int64)
        if n:
            self._k["cache_find"](
                self._grid(n, 32),
                (_BLOCK,),
                (keys, np.int64(n), self._digests, self._meta, np.uint64(self.n_buckets), slot),
            )
        return slot

    def _get_versions(self, keys: Any) -> tuple[Any, Any]:
        cp = self._cp
        slot = self._find(keys)
        hit = slot >= 0
        return cp.where(hit, self._ver[cp.maximum(slot, 0)], 0), hit

    def _table_args(self) -> tuple[Any, ...]:
        return (self._digests, self._meta, self._ver, self._stamp, self._vals, self._locks)

    def _upsert(
        self, keys: Any, values: Any, versions: Any, clock: int, insert: bool
    ) -> dict[str, int]:
        cp = self._cp
        n = int(keys.shape[0])
        if n == 0:
            return {"inserted_empty": 0, "evictions": 0, "updates": 0, "dropped": 0, "absent": 0}
        if values.data.ptr % self._vec:
            values = values.copy()  # a view at an odd offset: realign for vector loads
        counters = cp.zeros(8, dtype=cp.uint64)
        absent = cp.empty(n, dtype=cp.uint8)
        common = (np.uint64(self.n_buckets), np.int32(self._nvec), _signed32(clock))
        grid = self._grid(n, 32)
        self._k["cache_apply"](
            grid,
            (_BLOCK,),
            (keys, np.int64(n), values, versions, *self._table_args(), *common, absent, counters),
        )
        c = counters.get().astype(np.int64)  # absent count: skip the insert pass if none
        if insert and c[5]:
            score = clock if self.policy == "lru" else (1 << 32) | (clock & 0xFFFFFFFF)
            self._k["cache_insert"](
                grid,
                (_BLOCK,),
                (
                    keys,
                    np.int64(n),
                    values,
                    versions,
                    *self._table_args(),
                    *common,
                    np.uint64(score),
                    absent,
                    counters,
                ),
            )
            c = counters.get().astype(np.int64)
        return {
            "inserted_empty": int(c[1]),
            "evictions": int(c[2]),
            "updates": int(c[3]),
            "dropped": int(c[4]),
            "absent": 0 if insert else int(c[5]),
        }

    def _evict(self, keys: Any) -> int:
        cp = self._cp
        n = int(keys.shape[0])
        if n == 0:
            return 0
        counters = cp.zeros(8, dtype=cp.uint64)
        self._k["cache_remove"](
            self._grid(n, 32),
            (_BLOCK,),
            (
                keys,
                np.int64(n),
                self._digests,
                self._meta,
                self._ver,
                self._stamp,
                self._locks,
                np.uint64(self.n_buckets),
                counters,
            ),
        )
        return int(counters[6].get())

    def _clear(self) -> None:
        for a in (self._digests, self._meta, self._ver, self._stamp, self._vals):
            a.fill(0)

    def _hits_total(self) -> int:
        return int(self._counters[0].get())

    # ------------------------------------------------------------------ staged stream writes
    def _stage_setup(self, cp: Any) -> None:
        self._stage_lock = threading.Lock()  # one writer of the staging buffers at a time
        self._copy_stream = cp.cuda.Stream(non_blocking=True)
        self._stage: list[dict[str, Any] | None] = [None, None]
        self._stage_next = 0
        # device counters of staged writes not yet folded into the host's counts, per kind
        self._pending = {True: cp.zeros(8, dtype=cp.uint64), False: cp.zeros(8, dtype=cp.uint64)}
        self._pending_rows = {True: 0, False: 0}
        # host seconds: waiting for a buffer's previous use, copying rows into pinned memory,
        # enqueueing the copy (and waiting for it: write_packed), enqueueing under the lock;
        # GPU seconds (CUDA events): host -> device copy, kernels
        self.apply_profile = dict.fromkeys(
            ("stage_wait", "stage_copy", "copy_wait", "lock_enqueue", "h2d_gpu", "kernels_gpu"), 0.0
        )

    def upsert_async(self, keys: Any, values: Any, versions: Any, *, insert: bool = True) -> None:
        """``upsert`` (``update_if_present`` with ``insert=False``) of host (numpy) rows through
        the pinned staging buffers, returning once enqueued; device arrays take the synchronous
        path. Any operation on this cache issued after the return sees the rows."""
        if hasattr(keys, "__cuda_array_interface__") or hasattr(values, "__cuda_array_interface__"):
            (self.upsert if insert else self.update_if_present)(keys, values, versions)
            return
        k, parts, ver = host_stream_write(keys, values, versions, self.dim)
        n = int(k.shape[0])
        for lo in range(0, n, STAGE_ROWS):
            hi = min(n, lo + STAGE_ROWS)
            self._stage_write(k[lo:hi], row_pieces(parts, lo, hi), ver[lo:hi], insert)

    def _stage_buffer(self, n: int) -> dict[str, Any]:
        """The next of the two staging buffers, at least ``n`` rows, once its last use is done."""
        cp = self._cp
        i = self._stage_next
        self._stage_next ^= 1
        buf = self._stage[i]
        t0 = time.perf_counter()
        if buf is not None:
            buf["done"].synchronize()  # its copy read the pinned rows, its kernels the device ones
            prof = self.apply_profile
            prof["h2d_gpu"] += cp.cuda.get_elapsed_time(buf["t0"], buf["copied"]) / 1e3
            prof["kernels_gpu"] += cp.cuda.get_elapsed_time(buf["k0"], buf["done"]) / 1e3
        self.apply_profile["stage_wait"] += time.perf_counter() - t0
        if buf is None or buf["rows"] < n:
            rows = max(n, 4096, 2 * (buf["rows"] if buf else 0))
            rows = min(max(rows, n), max(n, STAGE_ROWS))
            nbytes = rows * (16 + self.dim * self.dtype.itemsize)
            buf = {
                "rows": rows,
                "host": cp.cuda.alloc_pinned_memory(nbytes),
                "dev": cp.empty(nbytes + rows, dtype=cp.uint8),  # + absent flags
                **{e: cp.cuda.Event() for e in ("t0", "copied", "k0", "done")},
                "piece": cp.cuda.Event(disable_timing=True),
            }
            self._stage[i] = buf
        return buf

    def _stage_write(
        self, k: np.ndarray, v: list[np.ndarray], ver: np.ndarray, insert: bool
    ) -> None:
        """Stage ``k``, ``ver`` and the rows ``v`` (arrays stacked in order) in pinned memory,
        one host -> device copy, then the kernels; returns once enqueued."""
        n = int(k.shape[0])
        if n == 0:
            return
        with self._stage_lock, self.device:
            buf = self._stage_buffer(n)
            t0 = time.perf_counter()
            nbytes = packed_bytes(n, self.dim * self.dtype.itemsize)
            host = np.frombuffer(buf["host"], dtype=np.uint8, count=nbytes)
            pack_rows(host, k, v, ver, self.dtype)
            self.apply_profile["stage_copy"] += time.perf_counter() - t0
            self._copy_and_write(buf, host, n, insert, wait_copy=False)

    def write_packed(self, host: np.ndarray, n: int, *, insert: bool = True) -> None:
        """``upsert_async`` of ``n`` rows the caller packed (:func:`~streamhps.cache.base.pack_rows`)
        into page-locked host memory (``cudaHostRegister``ed, or CuPy's pinned memory): one copy
        to the device, no staging copy. Returns once the copy finished (``host`` may be reused)
        and the write is enqueued: any operation on this cache issued after the return sees the
        rows. The write kernels are enqueued only after the copy, so a lookup enqueued meanwhile
        waits for the kernels, not for the copy. Keys, versions and rows are trusted as packed
        (an ingest process checked them; ``pack_rows`` wrote them)."""
        if n <= 0:
            return
        nbytes = packed_bytes(n, self.dim * self.dtype.itemsize)
        if host.dtype != np.uint8 or host.ndim != 1 or host.shape[0] < nbytes:
            raise CacheError(
                f"write_packed: {n} rows of dim {self.dim} {self.dtype} need {nbytes} packed "
                f"bytes (uint8), got {host.shape} {host.dtype}"
            )
        with self._stage_lock, self.device:
            self._copy_and_write(self._stage_buffer(n), host[:nbytes], n, insert, wait_copy=True)

    def _copy_and_write(
        self, buf: dict[str, Any], host: np.ndarray, n: int, insert: bool, wait_copy: bool
    ) -> None:
        """One host -> device copy of the packed ``host`` on the copy stream, then both write
        kernels on the cache's stream, ordered after the copy by its event (``wait_copy``: the
        host waits for the copy first, without the cache's lock). Stage lock held."""
        cp = self._cp
        rb = self.dim * self.dtype.itemsize
        t1 = time.perf_counter()
        dev = buf["dev"]
        buf["t0"].record(self._copy_stream)
        cp.cuda.runtime.memcpyAsync(
            dev.data.ptr, host.ctypes.data, packed_bytes(n, rb),
            cp.cuda.runtime.memcpyHostToDevice, self._copy_stream.ptr,
        )  # fmt: skip
        buf["copied"].record(self._copy_stream)
        if wait_copy:
            buf["copied"].synchronize()
        t2 = time.perf_counter()
        dk = dev[: 8 * n].view(cp.int64)
        dver = dev[8 * n : 16 * n].view(cp.int64)
        dv = dev[16 * n : n * (16 + rb)].view(self.dtype).reshape(n, self.dim)
        absent = dev[n * (16 + rb) : n * (17 + rb)]
        clock = self._tick()  # one clock for every piece: one write, as if one launch
        step = self.write_piece_rows
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            if lo:
                # the previous piece ran before this one is enqueued: a lookup enqueued
                # meanwhile waits for one piece's kernels, not the whole write's
                buf["piece"].synchronize()
            with self._lock, self._on_stream():
                if not lo:
                    if not wait_copy:
                        self.stream.wait_event(buf["copied"])
                    buf["k0"].record(self.stream)
                self._launch_write(
                    dk[lo:hi], dv[lo:hi], dver[lo:hi], absent[lo:hi], self._pending[insert],
                    clock, insert,
                )  # fmt: skip
                if hi < n:
                    buf["piece"].record(self.stream)
                else:  # the write's counters reach stats() with its last piece
                    buf["done"].record(self.stream)
                    self._pending_rows[insert] += n
        prof = self.apply_profile
        prof["copy_wait"] += t2 - t1
        prof["lock_enqueue"] += time.perf_counter() - t2

    resolves_duplicates = True  # the apply/insert kernels keep the highest version per key
    #: rows of a stream write enqueued at once: the write kernels run ~40 ns a row on an H200
    #: (bench/staleness.py's cache_detail), so a 64 k-row write held every lookup enqueued
    #: behind it for ~2.7 ms; in pieces of 8 k rows, each enqueued once the last one ran, a
    #: lookup waits for one piece (~0.35 ms) at most
    write_piece_rows = 1 << 13

    def _launch_write(
        self, keys: Any, values: Any, versions: Any, absent: Any, counters: Any, clock: int,
        insert: bool,
    ) -> None:  # fmt: skip
        """Both upsert kernels, no host synchronisation (the insert pass skips present keys)."""
        n = int(keys.shape[0])
        common = (np.uint64(self.n_buckets), np.int32(self._nvec), _signed32(clock))
        grid = self._grid(n, 32)
        self._k["cache_apply"](
            grid,
            (_BLOCK,),
            (keys, np.int64(n), values, versions, *self._table_args(), *common, absent, counters),
        )
        if insert:
            score = clock if self.policy == "lru" else (1 << 32) | (clock & 0xFFFFFFFF)
            self._k["cache_insert"](
                grid,
                (_BLOCK,),
                (keys, np.int64(n), values, versions, *self._table_args(), *common,
                 np.uint64(score), absent, counters),
            )  # fmt: skip

    def _fold_pending(self) -> None:
        """Add the counters of staged writes to the host's counts (synchronises; lock held)."""
        for insert, rows in self._pending_rows.items():
            if not rows:
                continue
            c = self._pending[insert].get().astype(np.int64)
            self._pending[insert].fill(0)
            self._pending_rows[insert] = 0
            self._count(
                {"inserted_empty": int(c[1]), "evictions": int(c[2]), "updates": int(c[3]),
                 "dropped": int(c[4]), "absent": 0 if insert else int(c[5])},
                rows,
            )  # fmt: skip
