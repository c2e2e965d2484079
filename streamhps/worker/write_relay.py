"""Cache writes relayed from an ingest process to the process whose cache they are.

Used by a ``cuda`` worker whose ingest runs in a process of its own (``serving.ingest =
"process"``, :mod:`streamhps.worker.ingest_process`). Its cache lives on the GPU, in the
serving process's CUDA context, and stays there: a second context would time-slice the GPU with
it and could preempt a write kernel in the middle of a row that a lookup of the other context
then reads. So the ingest process does the host half of every write (consume, decode, checks,
dedup, window, the fill checks against the window) and relays the write itself here:

* the ingest process packs the rows (:func:`~streamhps.cache.base.pack_rows`: keys | versions |
  rows, the layout of the cuda cache's own staging buffer) into one of two slots of the memory
  both processes map, and sends ``(table, slot, rows, insert)`` over a socket;
* the serving process's relay thread copies the slot to the device (the slots are page-locked
  there with ``cudaHostRegister``, so the copy is one DMA; no staging copy), enqueues the write
  on the worker's stream and answers;
* the ingest thread's write returns once every slot it sent is answered: its rows are then
  ordered before every later lookup, as after ``upsert_async`` in one process, so the caught-up
  times and visible latencies it records afterwards stay true. With two slots the ingest
  process packs the next piece while this side copies the last.

Any cache with ``upsert_async`` can sit behind the relay (the tests use a ``numpy`` cache); one
with ``write_packed`` (the cuda cache) takes the slot as it is.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Mapping
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from streamhps.cache.base import (
    host_stream_write,
    pack_rows,
    packed_bytes,
    row_pieces,
    storage_dtype,
    unpack_rows,
)
from streamhps.errors import CacheError, StreamHPSError

log = logging.getLogger(__name__)

#: slots of the relay: the ingest process packs one while the serving process copies the other
SLOTS = 2
#: bytes of one slot (a piece of a larger write is cut to fit; at least 64 rows of the widest table)
SLOT_BYTES = 16 << 20


def slot_bytes(row_bytes: Mapping[str, int]) -> int:
    """Bytes of one slot for tables of these row sizes (table -> bytes of one row)."""
    widest = max(row_bytes.values(), default=0)
    return max(SLOT_BYTES, packed_bytes(64, widest))


def relay_bytes(row_bytes: Mapping[str, int]) -> int:
    """Bytes of shared memory the relay of these tables needs (every slot)."""
    return SLOTS * slot_bytes(row_bytes)


def _slots(memory: np.ndarray) -> list[np.ndarray]:
    size = memory.shape[0] // SLOTS
    return [memory[i * size : (i + 1) * size] for i in range(SLOTS)]


class RelayedCache:
    """A table's cache as the ingest process sees it: writes go to the serving process.

    What the ingest path uses of a cache: ``upsert_async`` (stream rows, fills), ``upsert``
    (warm-up), ``capacity``, ``dim``, ``dtype``, ``resolves_duplicates``, ``stats``. Lookups are
    served by the serving process, never here. ``facts``: what the serving process's cache
    says of itself (capacity, dim, dtype, policy, resolves_duplicates).
    """

    def __init__(self, table: str, relay: WriteRelay, facts: Mapping[str, Any]) -> None:
        self.table = table
        self._relay = relay
        self.capacity = int(facts["capacity"])
        self.dim = int(facts["dim"])
        self.dtype = storage_dtype(facts["dtype"])
        self.policy = str(facts["policy"])
        self.resolves_duplicates = bool(facts["resolves_duplicates"])
        self.relayed_rows = 0

    def upsert_async(self, keys: Any, values: Any, versions: Any, *, insert: bool = True) -> None:
        """The write, relayed; returns once the serving process enqueued it."""
        k, parts, ver = host_stream_write(keys, values, versions, self.dim)
        n = int(k.shape[0])
        self._relay.write(self, k, parts, ver, insert)
        self.relayed_rows += n

    def upsert(self, keys: Any, values: Any, versions: Any) -> int:
        """As ``upsert_async`` (the warm-up's writes); returns the rows relayed."""
        self.upsert_async(keys, values, versions, insert=True)
        return int(np.asarray(keys).shape[0])

    def stats(self) -> dict[str, Any]:
        """The serving process holds the cache and its counters; here only what was relayed."""
        return {"relayed_rows": self.relayed_rows, "capacity": self.capacity}

    def __len__(self) -> int:
        raise CacheError(
            f"the {self.table} cache lives in the serving process; ask the worker there (stats())"
        )


class WriteRelay:
    """The ingest process's side: the slots and the connection to the serving process."""

    def __init__(self, conn: Connection, memory: np.ndarray) -> None:
        self._conn = conn
        self._slots = _slots(memory)
        self._next = 0
        self._sent: deque[int] = deque()  # slots sent, not yet answered (oldest first)
        self._lock = threading.Lock()  # one write at a time (the apply thread; warm-up before)

    def cache(self, table: str, facts: Mapping[str, Any]) -> RelayedCache:
        return RelayedCache(table, self, facts)

    def write(
        self,
        cache: RelayedCache,
        keys: np.ndarray,
        parts: list[np.ndarray],
        versions: np.ndarray,
        insert: bool,
    ) -> None:
        n = int(keys.shape[0])
        per_slot = self._slots[0].shape[0] // packed_bytes(1, cache.dim * cache.dtype.itemsize)
        with self._lock:
            try:
                for lo in range(0, n, per_slot):
                    hi = min(n, lo + per_slot)
                    if len(self._sent) == SLOTS:
                        self._answer()
                    i = self._next
                    self._next = (i + 1) % SLOTS
                    pack_rows(self._slots[i], keys[lo:hi], row_pieces(parts, lo, hi),
                              versions[lo:hi], cache.dtype)  # fmt: skip
                    self._conn.send(("write", cache.table, i, hi - lo, insert))
                    self._sent.append(i)
                while self._sent:
                    self._answer()
            except (OSError, EOFError):
                self._sent.clear()
                raise StreamHPSError(
                    "the serving process closed the cache-write relay (it stopped or exited)"
                ) from None

    def _answer(self) -> None:
        kind, value = self._conn.recv()
        self._sent.popleft()
        if kind == "error":
            while self._sent:  # the rest of this write was sent: take its answers too
                self._conn.recv()
                self._sent.popleft()
            raise value


class RelayApplier:
    """The serving process's side: a thread that applies relayed writes to ``caches``
    (table -> cache) from the slots in ``memory``, in the order they were sent."""

    def __init__(self, conn: Connection, memory: np.ndarray, caches: Mapping[str, Any]) -> None:
        self._conn = conn
        self._memory = memory
        self._slots = _slots(memory)
        self._caches = dict(caches)
        self._registered = False
        self.rows = 0
        self.writes = 0
        self.seconds = 0.0  # applying (copy + enqueue), not waiting for the next write
        self._thread = threading.Thread(target=self._run, name="streamhps-write-relay", daemon=True)

    def start(self) -> RelayApplier:
        if self._memory.size and any(hasattr(c, "write_packed") for c in self._caches.values()):
            self._register()
        self._thread.start()
        return self

    def _register(self) -> None:
        """Page-lock the slots for the GPU (one DMA from them); without it, each write is
        staged by the cache (a copy into its own pinned buffer) instead."""
        try:
            import cupy

            # portable: page-locked for every context, whichever GPU is current when it copies
            cupy.cuda.runtime.hostRegister(self._memory.ctypes.data, self._memory.nbytes, 1)
            self._registered = True
        except Exception as e:  # noqa: BLE001 - a working fallback; say why
            log.warning(
                "could not page-lock the cache-write relay's %d bytes (%s); relayed writes "
                "are staged through the cache's own pinned buffers instead",
                self._memory.nbytes, e,
            )  # fmt: skip

    def _run(self) -> None:
        while True:
            try:
                msg = self._conn.recv()
            except (EOFError, OSError):
                return
            t0 = time.perf_counter()
            try:
                _, table, slot, n, insert = msg
                self._apply(self._caches[table], self._slots[slot], n, insert)
                reply: tuple[str, Any] = ("ok", None)
                self.rows += n
                self.writes += 1
            except Exception as e:  # noqa: BLE001 - the ingest process raises it
                log.exception("relayed cache write failed")
                reply = ("error", e if isinstance(e, StreamHPSError) else CacheError(f"{e}"))
            self.seconds += time.perf_counter() - t0
            try:
                self._conn.send(reply)
            except OSError:
                return

    def _apply(self, cache: Any, slot: np.ndarray, n: int, insert: bool) -> None:
        if self._registered and hasattr(cache, "write_packed"):
            cache.write_packed(slot, n, insert=insert)
            return
        # upsert_async has read the arrays when it returns (both backends: the numpy cache
        # writes them, the cuda cache stages them), so the slot may be reused after the answer
        cache.upsert_async(*unpack_rows(slot, n, cache.dim, cache.dtype), insert=insert)

    def stats(self) -> dict[str, Any]:
        return {"writes": self.writes, "rows": self.rows, "seconds": self.seconds}

    def join(self, timeout: float) -> None:
        """Wait for the thread (it ends when the ingest process closes its end), then unpin."""
        self._thread.join(timeout)
        if self._registered and not self._thread.is_alive():
            with contextlib.suppress(Exception):
                import cupy

                cupy.cuda.runtime.hostUnregister(self._memory.ctypes.data)
            self._registered = False
