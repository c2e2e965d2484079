"""A worker's ingest in a process of its own; lookups served here, from the cache they always hit.

``serving.ingest = "process"`` (or ``InferenceWorker(..., ingest="process")``; ``"auto"``, the
default, chooses it on a worker with at least 4 cores).

Why: in one interpreter every lookup returns to Python after its compiled probe (cpu) or between
its CuPy calls (cuda) and waits for the GIL behind the ingest threads (the consumer's payload
copies, decode, window, markers). On the H200 at half the raw-consume rate that made a lookup's
p99 2.7-4.0x its idle p99 on cpu and 3.2-3.8x on cuda, whatever the switch interval
(``bench/staleness.py --lookup-breakdown``); with the ingest here it is 1.07-1.38x on cpu and
1.12-1.66x on cuda (``bench/staleness.py --devices cpu-process cpu-thread cuda-process
cuda-thread``).

Costs: one more process per worker (1-3 s more to start); a request that misses the cache
waits for one round trip to the child, which answers on one thread between its ingest threads'
turns at its GIL, one request at a time; statistics are requests too.

A cuda worker's cache stays on its GPU, in this process: the child runs the same cpu worker,
but its caches are :class:`~streamhps.worker.write_relay.RelayedCache` objects that send each
write here through two page-locked slots of the shared memory
(:mod:`streamhps.worker.write_relay` says why not a second CUDA context); what follows about
the cache table in shared memory is the cpu worker's case.

Layout: the serving process creates one anonymous memory file (``memfd``) holding every table's
cache (:meth:`~streamhps.cache.numpy_backend.NumpyCache.table_bytes` each: rows, versions, scores
and the table's gate, a ticket lock in that memory that works across processes), the caught-up
time of every partition (:mod:`streamhps.worker.staleness`) and a status word, then starts
``python -m streamhps.worker.ingest_process`` with the file and two socket pairs. The child runs
an ordinary cpu :class:`~streamhps.worker.core.InferenceWorker` (consumer, fetch and apply
threads, windows, tracker, head probe, warm-up) whose caches and caught-up times live in that
memory; the serving process looks the caches up in place.

What crosses the boundary, and how:

* a hit: nothing (the shared table; its gate orders a lookup with each written piece);
* readiness and bounded reads: the caught-up times and the status word, read in place;
* a miss: one request to the child for the window's rows of every missed key of the request,
  then LMDB is read here; the rows found go back to the child's apply thread as a fill, checked
  against the window there as in a worker that ingests on threads (invariant 3 unchanged);
* dense models: sent to the serving process as they arrive; callbacks run on its event thread;
* stats, the staleness report, latencies, the ingest profile: requests.

The child ignores SIGINT (its parent decides when it stops) and exits when its parent stops it or
closes its end of the socket (the parent exited). Linux only (``memfd_create``).
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import pickle
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from streamhps.errors import StreamHPSError
from streamhps.processes import stop_process
from streamhps.worker.miss_path import window_rows
from streamhps.worker.write_relay import RelayApplier, WriteRelay, relay_bytes

if TYPE_CHECKING:
    from streamhps.worker.core import InferenceWorker
    from streamhps.worker.ingest import Fill

log = logging.getLogger(__name__)

#: the status word: the child sets it once its worker started, and while its ingest runs
STARTING, RUNNING, FAILED, STOPPED = 0, 1, 2, 3
_ALIGN = 4096
#: connections the serving process sends misses and fills on, each answered by its own thread
#: in the child: requests of several serving threads overlap (their LMDB reads here, the
#: transfers, the window reads that release the child's GIL)
DATA_CONNECTIONS = 4


@dataclass(frozen=True)
class Layout:
    """Where each part lives in the shared memory file: byte offsets and sizes."""

    caches: dict[str, tuple[int, int]]  # table -> (offset, bytes)
    caught_up: dict[str, tuple[int, int]]  # table -> (offset, partitions)
    status: int  # offset of one int64
    relay: tuple[int, int]  # (offset, bytes) of the cache-write relay's slots (cuda), or (0, 0)
    total: int

    @staticmethod
    def plan(
        cache_bytes: Mapping[str, int], partitions: Mapping[str, int], relay_bytes: int = 0
    ) -> Layout:
        at = 0
        caches: dict[str, tuple[int, int]] = {}
        for name, size in cache_bytes.items():
            caches[name] = (at, size)
            at += -(-size // _ALIGN) * _ALIGN
        relay = (at, relay_bytes)
        at += -(-relay_bytes // _ALIGN) * _ALIGN
        caught_up: dict[str, tuple[int, int]] = {}
        for name, n in partitions.items():
            caught_up[name] = (at, n)
            at += 8 * n
        status = at
        return Layout(caches, caught_up, status, relay, -(-(at + 8) // _ALIGN) * _ALIGN)


class SharedState:
    """The views of one mapping of the shared memory file."""

    def __init__(self, fd: int, layout: Layout) -> None:
        self.layout = layout
        self._map = mmap.mmap(fd, layout.total)
        # Huge pages where the kernel gives them to shared memory (shmem_enabled = advise):
        # asked for before the first touch, which allocates the pages (the serving process's
        # fresh tables write every page).
        with contextlib.suppress(AttributeError, OSError):
            self._map.madvise(mmap.MADV_HUGEPAGE)
        buf = np.frombuffer(self._map, dtype=np.uint8)
        self.cache_memory = {n: buf[o : o + s] for n, (o, s) in layout.caches.items()}
        self.caught_up = {
            n: buf[o : o + 8 * p].view(np.float64) for n, (o, p) in layout.caught_up.items()
        }
        self.status = buf[layout.status : layout.status + 8].view(np.int64)
        self.relay = buf[layout.relay[0] : layout.relay[0] + layout.relay[1]]

    def prefault(self) -> None:
        """Map every page into this process now (a read per page): first touches would fault
        on the ingest thread with the table's gate held (``bench/ingest_apply.py``'s cold
        table, 2 cores: 360-419 ns/row without, 194-204 with, 191-199 in a private table)."""
        int(np.frombuffer(self._map, dtype=np.uint8)[:: mmap.PAGESIZE].max())


def memory_file(nbytes: int) -> int:
    """An anonymous memory file of ``nbytes`` (zeros): its descriptor, for ``SharedState``."""
    if not hasattr(os, "memfd_create"):
        raise StreamHPSError(
            "serving.ingest = 'process' needs memfd_create (Linux); use ingest = 'thread' here"
        )
    fd = os.memfd_create("streamhps-worker-tables", 0)
    os.ftruncate(fd, nbytes)
    return fd


class IngestProcess:
    """The serving process's side: the shared memory, the child process and the requests to it.

    ``setup``: what the child builds its worker from (config, store, the worker's options);
    ``cache_bytes``: table -> bytes of its cache in the shared memory (a cpu worker);
    ``partitions``: table -> partition count; ``relayed``: table -> the cache here that the
    child's writes are relayed to (a cuda worker, :mod:`streamhps.worker.write_relay`).
    """

    def __init__(
        self,
        setup: dict[str, Any],
        cache_bytes: Mapping[str, int],
        partitions: Mapping[str, int],
        relayed: Mapping[str, Any] | None = None,
    ) -> None:
        self._relayed = dict(relayed or {})
        row_bytes = {n: c.dim * c.dtype.itemsize for n, c in self._relayed.items()}
        self.layout = Layout.plan(
            cache_bytes, partitions, relay_bytes(row_bytes) if self._relayed else 0
        )
        self._fd = memory_file(self.layout.total)
        self.shared = SharedState(self._fd, self.layout)
        self.shared.status[0] = STARTING
        for a in self.shared.caught_up.values():
            a[:] = -np.inf
        self._setup = setup
        self._proc: subprocess.Popen[bytes] | None = None
        self._req: Connection | None = None  # setup, calls, stop: one at a time (_lock)
        self._events: Connection | None = None
        self._lock = threading.Lock()
        self._data: list[Connection] = []  # misses and fills: one request per connection
        self._free: queue.SimpleQueue[Connection] = queue.SimpleQueue()
        self._events_thread: threading.Thread | None = None
        self._relay_conn: Connection | None = None
        self.relay: RelayApplier | None = None
        self.dense: tuple[int, dict[str, np.ndarray]] | None = None
        self.dense_callbacks: list[Callable[[int, dict[str, np.ndarray]], None]] = []
        self.started: dict[str, Any] = {}

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self, timeout: float) -> dict[str, Any]:
        """Start the child and wait until its worker started (warm-up included); what it
        reports (start offsets, warmed rows)."""
        req_here, req_there = socket.socketpair()
        ev_here, ev_there = socket.socketpair()
        data = [socket.socketpair() for _ in range(DATA_CONNECTIONS)]
        fds = (req_there.fileno(), ev_there.fileno(), self._fd, *(d[1].fileno() for d in data))
        setup = {**self._setup, "layout": self.layout}
        relay_there = None
        passed = fds
        if self._relayed:
            relay_here, relay_there = socket.socketpair()
            passed = (*fds, relay_there.fileno())  # named in the setup, not in argv
            setup["relay"] = {
                "fd": relay_there.fileno(),
                "facts": {
                    n: {"capacity": c.capacity, "dim": c.dim, "dtype": c.dtype.name,
                        "policy": c.policy, "resolves_duplicates": c.resolves_duplicates}
                    for n, c in self._relayed.items()
                },
            }  # fmt: skip
            self._relay_conn = Connection(relay_here.detach())
            # running before the child starts: its warm-up writes through it
            self.relay = RelayApplier(self._relay_conn, self.shared.relay, self._relayed).start()
        # The child imports the streamhps this process runs, wherever it came from (an
        # install, PYTHONPATH, or a path a script put on sys.path at run time).
        here = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "streamhps.worker.ingest_process", *map(str, fds)],
                pass_fds=passed,
                env=env,
            )
        finally:
            for there in (req_there, ev_there, *(d[1] for d in data), relay_there):
                if there is not None:
                    there.close()
        self._req = Connection(req_here.detach())
        self._events = Connection(ev_here.detach())
        self._data = [Connection(d[0].detach()) for d in data]
        for conn in self._data:
            self._free.put(conn)
        try:
            self._req.send(setup)
        except OSError:  # it exited before reading what to run
            raise self._gone("starting its worker") from None
        reply = self._reply(self._req, timeout, "starting its worker")
        self.started = reply
        self._events_thread = threading.Thread(
            target=self._event_loop, name="streamhps-ingest-events", daemon=True
        )
        self._events_thread.start()
        log.info("worker ingest process started (pid %d)", self._proc.pid)
        return reply

    def _reply(self, conn: Connection, timeout: float, doing: str) -> Any:
        deadline = time.monotonic() + timeout
        while not conn.poll(0.05):
            if not self.alive():
                raise StreamHPSError(f"{self.exit_reason()} while {doing}; its log is above")
            if time.monotonic() > deadline:
                raise StreamHPSError(
                    f"the worker's ingest process (pid {self.pid}) did not answer within "
                    f"{timeout:.0f}s while {doing}"
                )
        try:
            kind, value = conn.recv()
        except (EOFError, OSError):
            raise self._gone(doing) from None
        if kind == "error":
            raise value
        return value

    def _gone(self, doing: str) -> StreamHPSError:
        """The error for a child whose end of the socket closed (waiting a little for its
        exit status, which follows)."""
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(5.0)
        return StreamHPSError(f"{self.exit_reason()} while {doing}; its log is above")

    def call(self, method: str, *args: Any, timeout: float = 60.0) -> Any:
        """``method(*args)`` of the child's worker, its result here."""
        with self._lock:
            if self._req is None or not self.alive():
                raise StreamHPSError(f"{self.exit_reason()}; the worker cannot answer {method}()")
            try:
                self._req.send(("call", method, args))
            except OSError:
                raise StreamHPSError(
                    f"{self.exit_reason()}; the worker cannot answer {method}()"
                ) from None
            return self._reply(self._req, timeout, f"answering {method}()")

    def windows(self, keys: Mapping[str, np.ndarray]) -> dict[str, tuple[int, tuple[Any, ...]]]:
        """table -> (window epoch, (vectors, versions, found)) of ``keys`` (unique, per table),
        from the child's windows: the epoch read before the rows, as a miss path needs it."""
        if not self.alive():
            raise StreamHPSError(f"{self.exit_reason()}; misses cannot be resolved")
        conn = self._free.get()
        try:
            conn.send(("windows", dict(keys)))
            return cast(
                "dict[str, tuple[int, tuple[Any, ...]]]",
                self._reply(conn, 60.0, "reading its windows"),
            )
        except OSError:  # the child went away, or stop() closed the connection meanwhile
            raise self._gone("reading its windows") from None
        finally:
            self._free.put(conn)

    def put(self, fill: Fill) -> None:
        """A read-through fill for the child's apply thread (no answer waited for; dropped
        when the child is gone: a worker that does not ingest has nothing to fill)."""
        if not self.alive():
            return
        conn = self._free.get()
        try:
            with contextlib.suppress(OSError):
                conn.send(("fill", fill))
        finally:
            self._free.put(conn)

    # ---------------------------------------------------------------- state read in place

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def running(self) -> bool:
        """The child's ingest runs (read in place: cheap enough for every bounded read)."""
        return int(self.shared.status[0]) == RUNNING and self.alive()

    def exit_reason(self) -> str:
        if self._proc is None:
            return "the worker's ingest process was not started"
        rc = self._proc.poll()
        if rc is None:
            return f"the worker's ingest process (pid {self._proc.pid}) is running"
        how = f"signal {-rc}" if rc < 0 else f"code {rc}"
        return f"the worker's ingest process (pid {self._proc.pid}) exited with {how}"

    # ---------------------------------------------------------------- events, stop

    def _event_loop(self) -> None:
        assert self._events is not None
        while True:
            try:
                kind, *rest = self._events.recv()
            except (EOFError, OSError):
                return
            if kind == "dense":
                version, tensors = rest
                self.dense = (version, tensors)
                for cb in list(self.dense_callbacks):
                    try:
                        cb(version, tensors)
                    except Exception:  # noqa: BLE001 - a bad callback must not stop the events
                        log.exception("dense-model callback %r failed", cb)

    def stop(self, timeout: float = 15.0) -> None:
        if self._proc is not None and self.alive() and self._req is not None:
            with self._lock, contextlib.suppress(OSError, EOFError, StreamHPSError):
                self._req.send(("stop",))
                self._reply(self._req, timeout, "stopping")
        if self._proc is not None:
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                stop_process(self._proc, name="worker ingest process")
        if self.relay is not None:  # its thread ends when the child's end closes
            self.relay.join(5.0)
        for conn in (self._req, self._events, *self._data, self._relay_conn):
            if conn is not None:
                conn.close()
        if self._events_thread is not None:
            self._events_thread.join(5.0)
        if self._fd >= 0:
            os.close(self._fd)  # the mapping stays valid while views of it live
            self._fd = -1


# -------------------------------------------------------------------- the child


def _serve(req: Connection, worker: InferenceWorker) -> None:
    """Answer the serving process on one connection until it says stop or closes its end."""
    while True:
        try:
            msg = req.recv()
        except (EOFError, OSError):
            return
        kind = msg[0]
        if kind == "fill":
            fills = worker._ingest.fills if worker._ingest is not None else None
            if fills is not None:
                fills.put(msg[1])
            continue
        if kind == "stop":
            worker.stop()
            req.send(("ok", None))
            return
        try:
            if kind == "windows":
                value: Any = window_rows(worker._tables, msg[1])
            elif kind == "call":
                value = getattr(worker, msg[1])(*msg[2])
            else:
                raise StreamHPSError(f"unknown request {kind!r} to the ingest process")
            reply: tuple[str, Any] = ("ok", value)
        except Exception as e:  # noqa: BLE001 - the serving process raises it
            reply = ("error", e)
        try:
            req.send(reply)
        except (pickle.PicklingError, TypeError, AttributeError):
            req.send(("error", StreamHPSError(f"{type(reply[1]).__name__}: {reply[1]}")))


def _watch(worker: InferenceWorker, status: np.ndarray, stop: threading.Event) -> None:
    """Keep the status word in step with the ingest thread (bounded reads read it in place)."""
    while not stop.wait(0.01):
        ing = worker._ingest
        status[0] = RUNNING if ing is not None and ing.error is None and ing.alive() else FAILED


def main(argv: list[str]) -> int:
    if len(argv) < 3 or not all(a.isdigit() for a in argv):
        print(
            "streamhps.worker.ingest_process is started by an InferenceWorker with "
            "serving.ingest = 'process' (it passes its sockets and memory as file descriptors), "
            "not by hand; to run a worker: streamhps serve",
            file=sys.stderr,
        )
        return 2
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the serving process decides when this stops
    req_fd, ev_fd, mem_fd, *data_fds = (int(a) for a in argv)
    req, events = Connection(req_fd), Connection(ev_fd)
    setup = req.recv()
    logging.basicConfig(
        level=setup.get("log_level", logging.WARNING),
        format="%(asctime)s ingest[%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    from streamhps.worker.core import InferenceWorker

    shared = SharedState(mem_fd, setup["layout"])
    shared.prefault()
    relayed = None
    if "relay" in setup:  # the caches are the serving process's (a cuda worker's GPU)
        relay = WriteRelay(Connection(setup["relay"]["fd"]), shared.relay)
        relayed = {t: relay.cache(t, f) for t, f in setup["relay"]["facts"].items()}
    try:
        worker = InferenceWorker(setup["config"], setup["store"], "cpu", **setup["options"])
        worker._use_shared(shared.cache_memory, shared.caught_up, relayed)
        worker.start()
    except BaseException as e:  # noqa: BLE001 - the serving process raises it
        shared.status[0] = FAILED
        try:
            req.send(("error", e))
        except (pickle.PicklingError, TypeError, AttributeError):
            req.send(("error", StreamHPSError(f"{type(e).__name__}: {e}")))
        return 1
    send_lock = threading.Lock()

    def dense(version: int, tensors: dict[str, np.ndarray]) -> None:
        with send_lock, contextlib.suppress(OSError):
            events.send(("dense", version, tensors))

    stop = threading.Event()
    shared.status[0] = RUNNING
    watcher = threading.Thread(target=_watch, args=(worker, shared.status, stop), daemon=True)
    watcher.start()
    req.send(
        ("ok", {"start_offsets": dict(worker._start_offsets), "warmed": dict(worker._warmed),
                "assigned_at": worker.assigned_at})
    )  # fmt: skip
    worker.on_dense(dense)
    for fd in data_fds:  # misses and fills, each connection on a thread of its own
        threading.Thread(
            target=_serve, args=(Connection(fd), worker), name="streamhps-requests", daemon=True
        ).start()
    try:
        _serve(req, worker)
    finally:
        stop.set()
        watcher.join()
        worker.stop()
        shared.status[0] = STOPPED
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
