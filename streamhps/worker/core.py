"""The inference worker: a cache kept fresh from the stream, with LMDB behind it.

::

    w = InferenceWorker.from_config("streamhps.toml", store="DIR", device="cpu")  # or "cuda"
    w.start(); w.wait_ready(timeout=60)
    values = w.lookup("user", keys)                        # numpy [n, dim]
    values = w.lookup("user", keys, consistency="bounded") # StaleReadError past the bound
    rows = w.lookup_many({"user": u, "item": i})           # every table of a request at once
    bags = w.lookup_pooled("item", keys, offsets=offs, mode="mean")   # multi-hot, pooled
    w.ready(); w.staleness(); w.stats(); w.stop()

    # a sparse shard: only the partitions a placement gives shard 1, rows from every processor's store
    w = InferenceWorker(cfg, store=["stores/0", "stores/1"], placement="placement.json", shard=1)

Start-up: open the LMDB tier read-only, read its offsets, optionally warm the cache from it,
then tail every partition of the configured tables from those offsets (``assign``, no consumer
group; partitions the store has no offset for start at the beginning) plus the dense-model
topic from its latest message.

A lookup reads the cache; keys it misses go to the window of rows this worker consumed that
LMDB may not hold yet, then to LMDB (one batched read); the higher version wins. Rows found
are inserted into the cache by the apply thread (checked against the window once more, so a
fill never brings back a row older than one already consumed). Keys no tier holds get the
table's ``missing`` policy. Lookups never write LMDB (invariant 8).

A request of several tables (:meth:`InferenceWorker.lookup_many`) resolves the misses of every
table together: window first, then ONE LMDB read transaction for all of them. On a ``cuda``
worker it stays on the GPU (:mod:`streamhps.worker.request`): one host-to-device copy of the
keys, one fused lookup per table, one small device-to-host read of the miss counts; the rows come
back as torch tensors on the worker's device (DLPack, no copy). ``lookup`` is the one-table case.

A sharded worker (``placement=`` and ``shard=``, or ``partitions=``) tails, caches and answers
only its partitions; its staleness and readiness cover only them, its caches are sized from the
placement, and a lookup of a key of another partition raises :class:`NotOwnedError` naming the
shard that serves it (never an answer from nothing). ``store`` may then name several stores (one
per processor shard, see :mod:`streamhps.store.shards`): each partition is read from the one
that holds it. ``device="cuda:N"`` puts the caches on GPU ``N`` (one worker per GPU).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from confluent_kafka import OFFSET_BEGINNING, KafkaException, TopicPartition

from streamhps import validation
from streamhps.config import INGEST_MODES, Config, dense_topic
from streamhps.consistency import check_consistency
from streamhps.errors import (
    ConfigError,
    StaleReadError,
    StreamHPSError,
    UnknownTableError,
    ValidationError,
)
from streamhps.kafka import make_consumer, max_message_bytes
from streamhps.partitioning import partition_of
from streamhps.placement import Placement
from streamhps.store.base import StoreReader, check_store_shape
from streamhps.store.shards import StorePaths, open_stores, store_dirs, wait_for_stores
from streamhps.topics import ensure_topics, planned_topics
from streamhps.worker.head import HeadProbe
from streamhps.worker.ingest import (
    POLL_TIMEOUT_S,
    DenseCallback,
    Ingestor,
    TableState,
    row_quantiles,
)
from streamhps.worker.miss_path import resolve_misses
from streamhps.worker.ownership import Ownership
from streamhps.worker.pooling import add_missed, bag_offsets
from streamhps.worker.request import DeviceRequests, check_keys
from streamhps.worker.staleness import LagTracker, max_seconds_of
from streamhps.worker.window import RecentRows

if TYPE_CHECKING:
    from streamhps.cache.cuda_backend import CudaCache
    from streamhps.worker.ingest_process import IngestProcess

log = logging.getLogger(__name__)

# Keys of a request above which a cpu worker looks its tables up on threads. H200 host (16 cores),
# 8 tables: 2 048 keys serial 0.51 ms; 8 192 keys on threads 4.5 ms (serial ~2 ms: the numpy
# probe holds the GIL for most of a table); 32 768 keys on threads 4.3 ms (serial ~8 ms).
_PARALLEL_KEYS = 16384
_DEVICE_RE = re.compile(r"^(cpu|cuda)(?::(\d+))?$")
CONSUMER_DEFAULTS: dict[str, Any] = {
    "auto.offset.reset": "earliest",  # a stored offset beyond the log (history lost): reread all
    # How long the broker may hold a fetch with no new data. The embedded Tansu broker seems to
    # hold it for the whole wait even when data arrives, so this adds up to its value to
    # publish -> visible latency (measured, 2 cores, 20k rows/s: raw consume p50 24 ms at 50,
    # 13 ms at 10); lower costs more idle fetch requests (~100/s per broker at 10).
    "fetch.wait.max.ms": 10,
    "fetch.max.bytes": 64 << 20,
    "max.partition.fetch.bytes": 8 << 20,
    "queued.max.messages.kbytes": 256 << 10,
}


#: cores below which ``serving.ingest = "auto"`` keeps a cpu worker's ingest on threads: the
#: child's fetch and apply threads and the serving threads then compete for cores instead of
#: the GIL (2 cores, bench/staleness.py at 25 % of the raw maximum: the child fell 1.6 s
#: behind where threads kept up, p99 46 ms; 16 cores: lookups 1.1x idle instead of 3.4x)
INGEST_PROCESS_MIN_CORES = 4


def _cores_for_an_ingest_process() -> bool:
    """Enough cores for ``"auto"`` to choose the ingest process, and memfd (Linux)."""
    try:
        cores = len(os.sched_getaffinity(0))  # the cores this process may run on
    except AttributeError:
        cores = os.cpu_count() or 1
    return cores >= INGEST_PROCESS_MIN_CORES and hasattr(os, "memfd_create")


class _WindowElsewhere:
    """The window of a worker whose ingest runs in another process (reached by requests)."""

    def __getattr__(self, name: str) -> Any:
        raise StreamHPSError(
            "this worker's window lives in its ingest process (serving.ingest = 'process')"
        )


class InferenceWorker:
    """One worker per GPU (or CPU process). Thread-safe lookups; ingest on two threads (fetch:
    consume and decode; apply: window and cache writes, :mod:`streamhps.worker.ingest`), in
    this process or, by default on 4 cores or more, in a child process (``ingest``,
    :mod:`streamhps.worker.ingest_process`) that writes a cpu cache in memory both map, or
    relays its writes to a cuda cache here (:mod:`streamhps.worker.write_relay`).

    ``config``: the deployment :class:`~streamhps.config.Config`; ``store``: the LMDB directory
    the processor writes (or several, one per processor shard, or a directory of them: see
    :func:`streamhps.store.open_stores`); ``device``: ``"cpu"`` (numpy cache), ``"cuda"`` or
    ``"cuda:N"`` (CuPy cache on GPU ``N``).
    ``probe_interval_s``: how often the broker is asked for the head of every partition
    (staleness resolution; default a tenth of ``max_staleness_s``, at most 0.1 s).
    ``poll_timeout_s``: how long the fetch thread waits in one consume call while nothing
    arrives (a message ends the wait at once), and the apply thread for a consumed batch;
    read-through fills and the store's offsets are taken between batches, so it bounds how late
    they are on an idle stream.
    ``placement`` (a :class:`~streamhps.placement.Placement` or its file) and ``shard``: serve
    only that shard's partitions, with caches of the placement's ``cache_rows``; or
    ``partitions``: an explicit ``table -> partitions`` mapping. ``follow_dense=False``: do not
    consume the dense-model topic (a sparse shard answers lookups only).
    ``ingest``: ``"auto"``, ``"thread"`` or ``"process"`` (default: ``serving.ingest``; see
    :class:`~streamhps.config.ServingSettings`).
    """

    def __init__(
        self,
        config: Config,
        store: StorePaths,
        device: str = "cpu",
        *,
        placement: Placement | str | os.PathLike[str] | None = None,
        shard: int | None = None,
        partitions: Mapping[str, Sequence[int]] | None = None,
        follow_dense: bool = True,
        cache_capacity: int | None = None,
        cache_policy: str = "lru",
        warm_from_store: bool | None = None,
        probe_interval_s: float | None = None,
        batch_messages: int = 1024,
        poll_timeout_s: float = POLL_TIMEOUT_S,
        kafka_config: Mapping[str, Any] | None = None,
        store_wait_s: float = 0.0,
        ingest: str | None = None,
    ) -> None:
        m = _DEVICE_RE.match(device) if isinstance(device, str) else None
        if m is None or (m.group(1) == "cpu" and m.group(2) is not None):
            raise ConfigError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
        mode = config.serving.ingest if ingest is None else ingest
        if mode not in INGEST_MODES:
            raise ConfigError(
                f"ingest must be one of {INGEST_MODES} (serving.ingest), got {mode!r}"
            )
        if mode == "auto":
            mode = "process" if _cores_for_an_ingest_process() else "thread"
        self.ingest_mode = mode  # "thread" or "process"
        self.config = config
        self._store_arg = store
        # seconds start() waits for a store the processor has not created yet (progress logged)
        self.store_wait_s = store_wait_s
        self.store_paths = [os.fspath(p) for p in store_dirs(store)]
        self.store_path = ", ".join(self.store_paths)
        self.device = device
        self.backend = "numpy" if m.group(1) == "cpu" else "cuda"
        self.device_index = int(m.group(2)) if m.group(2) is not None else None
        # where results live, "cpu" or "cuda:N" (set at start for "cuda"); keys on any other
        # device are refused
        self.torch_device = "cpu" if self.backend == "numpy" else f"cuda:{self.device_index or 0}"
        self._requests: DeviceRequests | None = None
        # cpu worker: the tables of one large request are looked up on this many threads at once
        # (numpy releases the GIL in the gathers); 1 = one after the other
        self.host_lookup_threads = min(8, os.cpu_count() or 1)
        self._pool: ThreadPoolExecutor | None = None
        self.max_staleness_s = float(config.serving.max_staleness_s)
        self.cache_capacity = int(cache_capacity or config.serving.cache_capacity)
        self._capacity_given = cache_capacity is not None
        self.follow_dense = follow_dense
        self._ownership_args = {"placement": placement, "shard": shard, "partitions": partitions}
        self.ownership = Ownership(config, placement, shard, partitions)
        self.placement, self.shard = self.ownership.placement, self.ownership.shard
        self.owned = self.ownership.owned
        self.sharded = self.ownership.sharded
        self.cache_policy = cache_policy
        self.warm_from_store = (
            config.serving.warm_from_store if warm_from_store is None else warm_from_store
        )
        self.probe_interval_s = probe_interval_s or min(0.1, self.max_staleness_s / 10)
        self.batch_messages = batch_messages
        self.poll_timeout_s = poll_timeout_s
        self.kafka = {**config.kafka, **dict(kafka_config or {})}
        self._tables: dict[str, TableState] = {}
        self._store: StoreReader | None = None
        self._consumer: Any = None
        self._ingest: Ingestor | None = None
        served = self.ownership.served()
        self._tracker = LagTracker(
            {t.name: t.partitions for t in config.tables if t.name in served},
            served if self.sharded else None,
        )
        self._probe: HeadProbe | None = None
        self._stop = threading.Event()
        self._started = False
        self._stopped = False
        self.assigned_at: float | None = None  # perf_counter at the assign (benchmarks' clock)
        self._start_offsets: dict[tuple[str, int], int] = {}
        self._warmed: dict[str, int] = {}
        self._stats_lock = threading.Lock()
        self._lookup_counts = dict.fromkeys(
            ("lookups", "keys", "hits", "misses", "from_window", "from_store", "from_missing",
             "window_over_store"),
            0,
        )  # fmt: skip
        self._xp: Any = np
        self._dense_callbacks: list[DenseCallback] = []
        # ingest = "process": the child process that ingests (the serving side here); in the
        # child, the shared memory its caches live in
        self._remote: IngestProcess | None = None
        self._cache_memory: dict[str, Any] = {}
        # in a cuda worker's ingest process: table -> its RelayedCache
        self._relayed: dict[str, Any] = {}

    @classmethod
    def from_config(
        cls,
        config: str | os.PathLike[str] | Config,
        store: StorePaths,
        device: str = "cpu",
        **kwargs: Any,
    ) -> InferenceWorker:
        """Build a worker from a config file path (or a :class:`Config`)."""
        cfg = config if isinstance(config, Config) else Config.load(config)
        return cls(cfg, store, device, **kwargs)

    def _capacity_for(self, table: str) -> int:
        placed = self.ownership.cache_rows(table, self.cache_capacity)
        if placed is not None and not self._capacity_given:
            return placed
        return self.cache_capacity

    def _on_device(self) -> contextlib.AbstractContextManager[Any]:
        """The worker's GPU as the current device of the calling thread (CuPy's is per thread)."""
        if self.device_index is None:
            return contextlib.nullcontext()
        from streamhps.cache.cuda_backend import import_cupy

        return import_cupy().cuda.Device(self.device_index)

    # ---------------------------------------------------------------- lifecycle

    def _lower_switch_interval(self) -> None:
        """``serving.switch_interval_ms``: the process's GIL hand-over interval, lowered only."""
        ms = float(self.config.serving.switch_interval_ms)
        if ms > 0 and sys.getswitchinterval() > ms / 1e3:
            log.info(
                "Python thread switch interval %.3g ms -> %.3g ms for this process "
                "(serving.switch_interval_ms; 0 leaves it)", sys.getswitchinterval() * 1e3, ms,
            )  # fmt: skip
            sys.setswitchinterval(ms / 1e3)

    def _cache_options(self, table: str) -> dict[str, Any]:
        """The shared memory a table's cache lives in (the child of an ingest process)."""
        memory = self._cache_memory.get(table)
        return {} if memory is None else {"memory": memory, "attach": True}

    def _use_shared(
        self,
        cache_memory: dict[str, Any],
        caught_up: dict[str, np.ndarray],
        relayed: dict[str, Any] | None = None,
    ) -> None:
        """In the ingest process: caches in ``cache_memory`` (tables the serving process made),
        or ``relayed`` caches whose writes go to the serving process's (a cuda worker's,
        :mod:`streamhps.worker.write_relay`), and the caught-up times in ``caught_up``, where
        the serving process reads them."""
        self._cache_memory = dict(cache_memory)
        self._relayed = dict(relayed or {})
        served = self.ownership.served()
        self._tracker = LagTracker(
            {t.name: t.partitions for t in self.config.tables if t.name in served},
            served if self.sharded else None,
            caught_up_at=caught_up,
        )

    def start(self) -> InferenceWorker:
        """Open the store, warm the caches, assign every partition and start ingesting."""
        if self._started:
            return self
        from streamhps.cache import make_cache

        if self.ingest_mode == "process":
            return self._start_serving_side()

        self._lower_switch_interval()
        self._store = self._open_store()
        on_device = contextlib.ExitStack()
        try:
            on_device.enter_context(self._on_device())  # caches and warm-up on this worker's GPU
            cuda_options = self._device_requests()
            self._check_store_tables()
            ensure_topics(self.kafka, planned_topics(self.config.topic_prefix, self.config.tables))
            for spec in self.config.tables:
                if not self.owned.get(spec.name):
                    continue  # another shard serves all of it
                cache = self._relayed.get(spec.name)
                if cache is None:
                    cache = make_cache(
                        self.backend,
                        capacity=self._capacity_for(spec.name),
                        dim=spec.dim,
                        dtype=spec.dtype,
                        policy=self.cache_policy,
                        **cuda_options,
                        **self._cache_options(spec.name),
                    )
                self._tables[spec.name] = TableState(
                    spec,
                    self.config.topic(spec.name),
                    cache,
                    RecentRows(spec.dim, spec.np_dtype, spec.partitions),
                )
            # Offsets first, then rows: rows read later are at least as new as the offsets, and
            # replaying from older offsets changes nothing (versions decide).
            offsets = self._store.offsets()
            applied = {name: self._store_applied(name) for name in self._tables}
            if self.warm_from_store:
                for st in self._tables.values():
                    self._warmed[st.spec.name] = self._warm(st)
            assignment = []
            for st in self._tables.values():
                for p in self.owned[st.spec.name]:
                    start = offsets.get((st.topic, p))
                    self._start_offsets[(st.topic, p)] = start if start is not None else 0
                    self._tracker.start_at(
                        st.spec.name, p, start or 0, applied[st.spec.name].get(p)
                    )
                    assignment.append(
                        TopicPartition(
                            st.topic, p, start if start is not None else OFFSET_BEGINNING
                        )
                    )
            self._consumer = make_consumer(
                self.kafka,
                defaults=CONSUMER_DEFAULTS,
                # assign() only, no group: a unique id keeps commits of other processes apart
                overrides={"group.id": f"streamhps-worker-{uuid.uuid4().hex[:12]}"},
            )
            if self.follow_dense:
                assignment.append(self._dense_start())
            # the compiled checks loaded (or compiled) before the stream flows: ~0.4 s in a
            # fresh process, which the first rows waited for after the assign
            validation.warm(st.spec.np_dtype for st in self._tables.values())
            self.assigned_at = time.perf_counter()
            self._consumer.assign(assignment)
            self._ingest = Ingestor(
                self._consumer, self._tables, dense_topic(self.config.topic_prefix), self._tracker, self._store, batch_messages=self.batch_messages, poll_timeout_s=self.poll_timeout_s,
                max_message_bytes=max_message_bytes(self.config.kafka),
            )  # fmt: skip
            self._ingest.dense_callbacks = self._dense_callbacks
            self._ingest.context = self._on_device
            self._ingest.start()
            self._probe = HeadProbe(
                self.kafka,
                {
                    st.topic: (st.spec.name, self.owned[st.spec.name])
                    for st in self._tables.values()
                },
                self._tracker,
                interval_s=self.probe_interval_s,
                timeout_s=max(1.0, self.max_staleness_s),
            ).start()
        except BaseException:
            self._close_resources()
            raise
        finally:
            on_device.close()
        self._started = True
        log.info(
            "worker started on %s (%s cache%s), tables %s, start offsets %s",
            self.store_path, self.device, "" if not self.sharded else f", partitions {self.owned}",
            sorted(self._tables), self._start_offsets,
        )  # fmt: skip
        return self

    def _open_store(self) -> StoreReader:
        """The LMDB store(s) opened, first waiting up to ``store_wait_s`` for a processor that
        has not created them yet."""
        if self.store_wait_s > 0 and wait_for_stores(self._store_arg, self.store_wait_s):
            self.store_paths = [os.fspath(p) for p in store_dirs(self._store_arg)]
            self.store_path = ", ".join(self.store_paths)
        return open_stores(self.store_paths)

    def _device_requests(self) -> dict[str, Any]:
        """A cuda worker's request path on the current GPU (call with the worker's device
        current): every cache of the worker on one stream, so a request's lookups need no
        cross-stream events (:mod:`streamhps.worker.request`). The caches' ``make_cache``
        options; none for a cpu worker."""
        if self.backend != "cuda":
            return {}
        from streamhps.cache.cuda_backend import import_cupy

        cupy = import_cupy()
        self._xp = cupy
        gpu = cupy.cuda.Device().id
        self.torch_device = f"cuda:{gpu}"
        stream = cupy.cuda.Stream(non_blocking=False)
        self._requests = DeviceRequests(gpu, stream)
        return {"device": gpu, "stream": stream}

    def _relays_writes(self) -> bool:
        """ingest = "process": whether the caches live here with the child's writes relayed to
        them (a cuda worker: its GPU) rather than in memory both processes map (a cpu worker)."""
        return self.backend == "cuda"

    def _start_serving_side(self) -> InferenceWorker:
        """ingest = "process": the caches made here; the child process warms them and ingests
        (:mod:`streamhps.worker.ingest_process`); this process serves. A cpu worker's caches
        live in the shared memory (the child writes them in place); a cuda worker's on its GPU,
        the child's writes relayed to them (:mod:`streamhps.worker.write_relay`)."""
        from streamhps.cache import make_cache
        from streamhps.cache.numpy_backend import NumpyCache
        from streamhps.worker.ingest_process import IngestProcess

        self._lower_switch_interval()
        self._store = self._open_store()
        on_device = contextlib.ExitStack()
        try:
            self._check_store_tables()
            # here too: a Kafka setting the client refuses is raised as it is, before a child
            ensure_topics(self.kafka, planned_topics(self.config.topic_prefix, self.config.tables))
            specs = [spec for spec in self.config.tables if self.owned.get(spec.name)]
            capacity = {spec.name: self._capacity_for(spec.name) for spec in specs}
            served = self.ownership.served()
            options = {
                **self._ownership_args, "follow_dense": self.follow_dense,
                "cache_capacity": self.cache_capacity if self._capacity_given else None,
                "cache_policy": self.cache_policy, "warm_from_store": self.warm_from_store,
                "probe_interval_s": self.probe_interval_s, "batch_messages": self.batch_messages,
                "poll_timeout_s": self.poll_timeout_s, "kafka_config": self.kafka,
                "ingest": "thread",
            }  # fmt: skip
            setup = {
                "config": self.config, "store": self.store_paths, "options": options,
                "log_level": logging.getLogger("streamhps").getEffectiveLevel(),
            }  # fmt: skip
            partitions = {t.name: t.partitions for t in self.config.tables if t.name in served}
            caches: dict[str, Any] = {}
            if self._relays_writes():
                on_device.enter_context(self._on_device())
                cuda_options = self._device_requests()
                for spec in specs:
                    caches[spec.name] = make_cache(
                        self.backend, capacity=capacity[spec.name], dim=spec.dim,
                        dtype=spec.dtype, policy=self.cache_policy, **cuda_options,
                    )  # fmt: skip
                self._remote = IngestProcess(setup, {}, partitions, relayed=caches)
            else:
                self._remote = IngestProcess(
                    setup,
                    {s.name: NumpyCache.table_bytes(capacity[s.name], s.dim, s.dtype) for s in specs},
                    partitions,
                )  # fmt: skip
                for spec in specs:
                    caches[spec.name] = NumpyCache(
                        capacity[spec.name], spec.dim, spec.dtype, self.cache_policy,
                        memory=self._remote.shared.cache_memory[spec.name],
                    )  # fmt: skip
            self._remote.dense_callbacks = self._dense_callbacks
            for spec in specs:
                window = cast(RecentRows, _WindowElsewhere())
                self._tables[spec.name] = TableState(
                    spec, self.config.topic(spec.name), caches[spec.name], window
                )
            started = self._remote.start(timeout=max(120.0, 2 * self.store_wait_s))
        except BaseException:
            if self._remote is not None:
                self._remote.stop()
            self._close_resources()
            raise
        finally:
            on_device.close()
        self._start_offsets = started["start_offsets"]
        self._warmed = started["warmed"]
        self.assigned_at = started["assigned_at"]
        self._started = True
        log.info(
            "worker serving %s (%s, ingest in process %d), tables %s",
            self.store_path,
            f"{self.device} cache, writes relayed from the ingest process"
            if self._remote.relay is not None else "cpu cache in shared memory",
            self._remote.pid, sorted(self._tables),
        )  # fmt: skip
        return self

    def stop(self) -> None:
        """Stop ingesting and release the consumer and the store."""
        if self._stopped:
            return
        self._stopped = True
        self._stop.set()
        if self._remote is not None:
            self._remote.stop()
        if self._ingest is not None:
            self._ingest.stop()
        if self._probe is not None:
            self._probe.stop()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self._close_resources()

    def _close_resources(self) -> None:
        if self._consumer is not None:
            try:
                self._consumer.close()
            except (KafkaException, RuntimeError) as e:
                log.warning("closing the worker's consumer: %s", e)
            self._consumer = None
        if self._store is not None:
            self._store.close()
            self._store = None

    def __enter__(self) -> InferenceWorker:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _reader(self) -> StoreReader:
        """The open store (between start and stop)."""
        if self._store is None:
            raise StreamHPSError("worker is not running: call start() first")
        return self._store

    def _check_store_tables(self) -> None:
        stored = self._reader().tables()
        for spec in self.config.tables:
            old = stored.get(spec.name)
            check_store_shape(
                spec, old, self.store_path,
                "serve the store written for this config (--store), or give the table the "
                "store's shape",
            )  # fmt: skip
            owned = self.owned.get(spec.name, [])
            if old is not None and owned:
                held = set(self._reader().held_partitions(spec.name))
                lacking = sorted(set(owned) - held)
                if lacking:  # their misses would find nothing: refuse rather than serve defaults
                    raise ConfigError(
                        f"table {spec.name!r}: partitions {lacking} this worker serves are in none "
                        f"of the stores {self.store_paths} (they hold {sorted(held)}); give the "
                        "store of every processor shard that holds them (--store, repeatable)"
                    )

    def _store_applied(self, table: str) -> dict[int, int]:
        try:
            return dict(self._reader().partition_applied_versions(table))
        except UnknownTableError:
            return {}

    def _warm(self, st: TableState) -> int:
        """Fill the cache from LMDB, up to its capacity (rows in key order)."""
        if st.spec.name not in self._reader().tables():
            return 0
        n = 0
        cap = int(st.cache.capacity)
        mask = self.ownership.masks.get(st.spec.name)
        for keys, vectors, versions in self._reader().iter_rows(st.spec.name):
            if mask is not None:  # a store holds the partitions of its processor, not of this shard
                mine = mask[partition_of(keys, st.spec.partitions)]
                keys, vectors, versions = keys[mine], vectors[mine], versions[mine]
            take = min(keys.shape[0], cap - n)
            if take <= 0:
                break
            st.cache.upsert(
                self._to_dev(keys[:take]),
                self._to_dev(vectors[:take]),
                self._to_dev(versions[:take]),
            )
            n += take
        log.info("warmed the %s cache with %d rows from %s", st.spec.name, n, self.store_path)
        return n

    def _dense_start(self) -> TopicPartition:
        topic = dense_topic(self.config.topic_prefix)
        try:
            lo, hi = self._consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)
        except KafkaException as e:
            log.warning(
                "cannot read the watermarks of %s (%s); reading it from the beginning", topic, e
            )
            return TopicPartition(topic, 0, OFFSET_BEGINNING)
        # Only the newest dense model matters.
        return TopicPartition(topic, 0, hi - 1 if hi > lo else OFFSET_BEGINNING)

    # ---------------------------------------------------------------- readiness

    def not_ready_reason(self) -> str | None:
        """Why the worker is not ready, or None when it is."""
        if not self._started:
            return "not started"
        if self._stopped:
            return "stopped"
        if self._remote is not None:
            if not self._remote.alive():
                return f"ingest failed: {self._remote.exit_reason()}"
            try:
                return cast("str | None", self._remote.call("not_ready_reason"))
            except StreamHPSError as e:
                return f"ingest failed: {e}"
        ing = self._ingest
        if ing is None or ing.error is not None:
            return f"ingest failed: {ing.error if ing else 'no ingest thread'}"
        if not ing.alive():
            return "ingest thread is not running"
        for name in self._tables:
            secs, p = self._tracker.max_seconds(name)
            if secs == float("inf"):
                return f"table {name!r} partition {p} has not caught up with the head of the stream yet"
            if secs > self.max_staleness_s:
                return (
                    f"table {name!r} partition {p} is {secs:.2f}s behind the head "
                    f"(serving.max_staleness_s = {self.max_staleness_s}s)"
                )
        return None

    def ready(self) -> bool:
        return self.not_ready_reason() is None

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until ready; raise :class:`StaleReadError` with the reason after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            reason = self.not_ready_reason()
            if reason is None:
                return
            if time.monotonic() >= deadline or reason in ("not started", "stopped"):
                raise StaleReadError(f"worker not ready after {timeout:.1f}s: {reason}")
            time.sleep(0.01)

    def staleness(self) -> dict[str, dict[int, dict[str, Any]]]:
        """Per table, per partition: ``seconds`` behind the head (see
        :mod:`streamhps.worker.staleness`), ``versions_behind``, ``applied_version``, ``offset``
        (next to consume), ``high_watermark`` and ``lag_messages``."""
        if self._remote is not None:
            return cast("dict[str, dict[int, dict[str, Any]]]", self._remote.call("staleness"))
        return self._tracker.report()

    def _max_seconds(self, table: str) -> tuple[float, int]:
        if self._remote is not None:
            return max_seconds_of(self._remote.shared.caught_up[table])
        return self._tracker.max_seconds(table)

    def _ingest_failure(self) -> str:
        """Why reads cannot be bounded: the ingest stopped (a thread, or the child process)."""
        if self._remote is not None:
            if not self._remote.alive():
                return f"its ingest stopped: {self._remote.exit_reason()}"
            return "its ingest process is not ingesting (see its log)"
        return "its ingest thread is not running"

    def _ingest_failed(self) -> bool:
        if self._remote is not None:
            return not self._remote.running()
        ing = self._ingest
        return ing is None or ing.error is not None or not ing.alive()

    def _check_bound(self, table: str, timeout: float | None) -> None:
        deadline = time.monotonic() + (timeout or 0.0)
        while True:
            secs, p = self._max_seconds(table)
            failed = self._ingest_failed()
            if secs <= self.max_staleness_s and not failed:
                return
            if time.monotonic() >= deadline:
                what = (
                    self._ingest_failure()
                    if failed
                    else f"partition {p} is {secs:.2f}s behind the head"
                )
                raise StaleReadError(
                    f"bounded read of table {table!r} refused: {what} (serving.max_staleness_s = "
                    f"{self.max_staleness_s}s); retry later, pass timeout= to wait, or read with "
                    "consistency='eventual'"
                )
            time.sleep(0.005)

    # ---------------------------------------------------------------- lookups

    def lookup(
        self,
        table: str,
        keys: Any,
        consistency: str = "eventual",
        timeout: float | None = None,
        *,
        as_numpy: bool = True,
    ) -> Any:
        """Rows of ``keys`` (``[n, dim]`` of the table's dtype; numpy, or CuPy with
        ``as_numpy=False`` on a cuda worker).

        ``consistency="bounded"`` raises :class:`StaleReadError` if the table is further behind
        than ``serving.max_staleness_s``, after waiting up to ``timeout`` seconds for it to catch
        up. Keys no tier holds follow the table's ``missing`` policy.
        """
        out = self._lookup_tables({table: keys}, consistency, timeout)[table]
        if as_numpy and self._xp is not np:
            with self._on_device():
                return self._xp.asnumpy(out)
        return out

    def lookup_device(
        self, table: str, keys: Any, consistency: str = "eventual", timeout: float | None = None
    ) -> Any:
        """Like :meth:`lookup` but leaves the rows on the device (CuPy) on a cuda worker."""
        return self.lookup(table, keys, consistency, timeout, as_numpy=False)

    def lookup_many(
        self, keys: Mapping[str, Any], consistency: str = "eventual", timeout: float | None = None
    ) -> dict[str, Any]:
        """Rows of every table of one request: ``{table: keys}`` -> ``{table: [n_t, dim]}``.

        Keys may be numpy, CuPy or torch (host, or on this worker's GPU; keys on another device
        are refused). On a cuda worker the rows are torch tensors on the worker's device (DLPack
        views of the lookup's output, no copy), and a request whose keys all hit synchronises
        with the host once (the per-table miss counts); misses of every table are resolved
        together (window, then one LMDB read transaction, one host-to-device copy). On a cpu
        worker the rows are numpy arrays. ``consistency``/``timeout`` and the ``missing`` policy
        as in :meth:`lookup`, applied to every table of the request.
        """
        rows = self._lookup_tables(keys, consistency, timeout)
        if self._xp is np:
            return rows
        import torch

        return {t: torch.from_dlpack(a) for t, a in rows.items()}

    def lookup_pooled(
        self,
        table: str,
        keys: Any,
        offsets: Any = None,
        lengths: Any = None,
        mode: str = "sum",
        consistency: str = "eventual",
        timeout: float | None = None,
        *,
        include_last_offset: bool = False,
    ) -> Any:
        """Pooled (multi-hot) rows: bag ``b`` is the sum, or the mean, of the rows of its keys,
        equal to ``torch.nn.functional.embedding_bag(keys, rows, offsets, mode=mode)``.

        Bags are given by ``offsets`` (the start of each bag, as ``embedding_bag`` takes them;
        with ``include_last_offset=True`` one more entry, ``len(keys)``) or by ``lengths`` (keys
        per bag). On a cuda worker one fused kernel reads each resident row once and the result
        is a torch tensor on the device; missed rows are resolved as in :meth:`lookup` and added
        in. On a cpu worker: numpy. An empty bag is zeros.
        """
        with self._on_device():
            return self._lookup_pooled(
                table, keys, offsets, lengths, mode, consistency, timeout, include_last_offset
            )

    def _lookup_pooled(
        self,
        table: str,
        keys: Any,
        offsets: Any,
        lengths: Any,
        mode: str,
        consistency: str,
        timeout: float | None,
        include_last_offset: bool,
    ) -> Any:
        from streamhps.cache.base import POOLING

        st = self._table(table)
        self._check_request(consistency)
        if mode not in POOLING:
            raise ValidationError(f"mode must be one of {POOLING}, got {mode!r}")
        k = check_keys(table, keys, self.torch_device, self._max_keys(), self._xp)
        self._check_owned(st, k)
        offs = bag_offsets(table, offsets, lengths, int(k.shape[0]), include_last_offset)
        if consistency == "bounded":
            self._check_bound(table, timeout)
        counts = {"lookups": 1, "keys": int(k.shape[0])}
        if self._requests is None:
            pooled, hit = st.cache.lookup_pooled(k, offs, mode)
            miss = np.flatnonzero(~hit)
            if miss.size:
                rows = self._resolve_many({table: k[miss]}, counts)[table]
                add_missed(np, pooled, rows, miss, offs, mode)
        else:
            pooled, miss = self._pooled_device(st, k, offs, mode, counts)
        counts["hits"] = counts["keys"] - int(miss.size)
        counts["misses"] = int(miss.size)
        self._add_counts(counts)
        if self._xp is np:
            return pooled
        import torch

        return torch.from_dlpack(pooled)

    def _pooled_device(
        self, st: TableState, k: Any, offs: np.ndarray, mode: str, counts: dict[str, int]
    ) -> tuple[Any, np.ndarray]:
        req = self._requests
        assert req is not None
        cp = self._xp
        with req.device, req.stream:
            kd = cp.asarray(k)  # host keys: one H2D copy; device keys: as they are
            od = cp.asarray(offs)
            out = cp.empty((offs.shape[0] - 1, st.spec.dim), dtype=st.cache.dtype)
            hit = cp.empty(int(kd.shape[0]), dtype=cp.bool_)
            misses = cp.zeros(1, dtype=cp.uint32)
            cast("CudaCache", st.cache).pooled_into(kd, od, mode, out, hit, misses)
            if int(misses.get(stream=req.stream)[0]) == 0:  # the one synchronisation
                return out, np.zeros(0, np.int64)
            miss = cp.flatnonzero(~hit).get(stream=req.stream)
            mk = k[miss] if isinstance(k, np.ndarray) else kd[cp.asarray(miss)].get()
            rows = self._resolve_many({st.spec.name: mk}, counts)[st.spec.name]
            add_missed(cp, out, cp.asarray(rows), cp.asarray(miss), cp.asarray(offs), mode)
            req.stream.synchronize()
        return out, miss

    def _max_keys(self) -> int:
        return int(self.config.serving.max_lookup_keys)

    def _check_request(self, consistency: str) -> None:
        check_consistency(consistency)
        if not self._started or self._stopped:
            raise StreamHPSError("worker is not running: call start() first")

    def _lookup_tables(
        self, keys: Mapping[str, Any], consistency: str, timeout: float | None
    ) -> dict[str, Any]:
        """The shared lookup path: table -> rows (numpy on cpu, CuPy on cuda)."""
        with self._on_device():
            return self._lookup_tables_here(keys, consistency, timeout)

    def _lookup_tables_here(
        self, keys: Mapping[str, Any], consistency: str, timeout: float | None
    ) -> dict[str, Any]:
        if not isinstance(keys, Mapping):
            raise ValidationError(
                f"lookup_many takes a mapping of table name -> keys, got {type(keys).__name__}"
            )
        states = {t: self._table(t) for t in keys}
        self._check_request(consistency)
        limit = self._max_keys()
        ks = {t: check_keys(t, k, self.torch_device, limit, self._xp) for t, k in keys.items()}
        for t, k in ks.items():
            self._check_owned(states[t], k)
        if consistency == "bounded":
            deadline = time.monotonic() + (timeout or 0.0)
            for t in ks:
                self._check_bound(t, max(0.0, deadline - time.monotonic()))
        if not ks:
            return {}
        n_keys = sum(int(k.shape[0]) for k in ks.values())
        counts = {"lookups": len(ks), "keys": n_keys}
        if self._requests is not None:
            rows, misses = self._requests.lookup(
                {t: states[t].cache for t in ks}, ks, lambda m: self._resolve_many(m, counts)
            )
            n_miss = int(misses.sum())
        else:
            rows, n_miss = self._lookup_host(states, ks, counts)
        counts["hits"] = n_keys - n_miss
        counts["misses"] = n_miss
        self._add_counts(counts)
        return rows

    def _lookup_host(
        self, states: dict[str, TableState], keys: dict[str, np.ndarray], counts: dict[str, int]
    ) -> tuple[dict[str, np.ndarray], int]:
        rows: dict[str, np.ndarray] = {}
        missed: dict[str, np.ndarray] = {}
        threads = min(self.host_lookup_threads, len(keys))
        if threads > 1 and sum(int(k.shape[0]) for k in keys.values()) >= _PARALLEL_KEYS:
            with self._stats_lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(
                        self.host_lookup_threads, thread_name_prefix="streamhps-lookup"
                    )
            found_all = dict(
                zip(
                    keys,
                    self._pool.map(lambda t: states[t].cache.lookup(keys[t]), keys),
                    strict=True,
                )
            )
        else:
            found_all = {t: states[t].cache.lookup(k) for t, k in keys.items()}
        for t, (values, hit) in found_all.items():
            rows[t] = values
            if not hit.all():
                missed[t] = np.flatnonzero(~hit)
        if missed:
            found = self._resolve_many({t: keys[t][m] for t, m in missed.items()}, counts)
            for t, m in missed.items():
                if not rows[t].flags.writeable:
                    rows[t] = rows[t].copy()
                rows[t][m] = found[t]
        return rows, sum(int(m.size) for m in missed.values())

    def _add_counts(self, counts: dict[str, int]) -> None:
        with self._stats_lock:
            for name, v in counts.items():
                self._lookup_counts[name] += v

    def _resolve_many(
        self, missed: dict[str, np.ndarray], counts: dict[str, int]
    ) -> dict[str, np.ndarray]:
        """Rows of missed keys of several tables: :func:`~streamhps.worker.miss_path.resolve_misses`."""
        if self._remote is not None:
            remote = self._remote
            return resolve_misses(
                missed, counts, self._tables, self._reader(), remote, remote.windows
            )
        fills = self._ingest.fills if self._ingest is not None else None
        return resolve_misses(missed, counts, self._tables, self._reader(), fills)

    def _check_owned(self, st: TableState, keys: Any) -> None:
        self.ownership.check_keys(st.spec.name, st.spec.partitions, keys)

    def _table(self, table: str) -> TableState:
        try:
            return self._tables[table]
        except KeyError:
            raise self.ownership.table_error(table, list(self._tables), self._started) from None

    def _to_dev(self, a: np.ndarray) -> Any:
        if self._xp is np:
            return a
        with self._on_device():
            return self._xp.asarray(a)

    # ---------------------------------------------------------------- dense model

    def dense_model(self) -> tuple[int, dict[str, np.ndarray]] | None:
        """The newest dense model received: ``(version, name -> array)``, or None."""
        if self._remote is not None:
            return self._remote.dense
        return self._ingest.dense if self._ingest is not None else None

    def on_dense(self, callback: DenseCallback) -> None:
        """Call ``callback(version, tensors)`` (on the fetch thread) for every newer dense model;
        called at once with the current one if there is one."""
        self._dense_callbacks.append(callback)
        current = self.dense_model()
        if current is not None:
            callback(*current)

    # ---------------------------------------------------------------- statistics

    def visible_latencies(self) -> tuple[np.ndarray, np.ndarray]:
        """``(seconds, rows)``: publish -> visible to :meth:`lookup` of recent messages (up to
        65536) and the rows each carried (weights: quantiles over rows, as users see them)."""
        if self._remote is not None:
            return cast("tuple[np.ndarray, np.ndarray]", self._remote.call("visible_latencies"))
        if self._ingest is None:
            return np.zeros(0), np.zeros(0, dtype=np.int64)
        return self._ingest.latencies_rows()

    def reset_latencies(self) -> None:
        if self._remote is not None:
            self._remote.call("reset_latencies")
        if self._ingest is not None:
            self._ingest.reset_latencies()

    def ingest_profile(self) -> dict[str, Any]:
        """Seconds the ingest thread spent per stage since start or the last reset
        (:data:`streamhps.worker.ingest.STAGES`), with the wall time, rows and applies, and
        where publish -> visible went since the last :meth:`reset_latencies`
        (``latency_split``: :meth:`Ingestor.latency_split`)."""
        if self._remote is not None:
            out = cast("dict[str, Any]", self._remote.call("ingest_profile"))
            if self._remote.relay is not None:
                out["relay"] = self._remote.relay.stats()
        elif self._ingest is None:
            return {}
        else:
            out = self._ingest.profile.snapshot()
            out["latency_split"] = self._ingest.latency_split()
        for st in self._tables.values():
            detail = getattr(st.cache, "apply_profile", None)
            if detail:
                out.setdefault("cache_detail", {})[st.spec.name] = dict(detail)
        return out

    def reset_ingest_profile(self) -> None:
        if self._remote is not None:
            self._remote.call("reset_ingest_profile")
        if self._ingest is not None:
            self._ingest.profile.reset()
        for st in self._tables.values():
            detail = getattr(st.cache, "apply_profile", None)
            if detail:
                for k in detail:
                    detail[k] = 0.0

    def stats(self) -> dict[str, Any]:
        """Counters: ingest, DLQ, caches, windows, lookups and where misses were served from."""
        if self.device_index is not None:
            with self._on_device():
                return self._stats()
        return self._stats()

    def _stats(self) -> dict[str, Any]:
        if self._remote is not None:
            remote = cast("dict[str, Any]", self._remote.call("stats"))
            with self._stats_lock:  # lookups are served here, not in the ingest process
                remote["lookups"] = dict(self._lookup_counts)
            remote["ingest_process"] = {"pid": self._remote.pid}
            if self._remote.relay is not None:  # the caches are here, not in the child
                remote["ingest_process"]["relay"] = self._remote.relay.stats()
                for name, st in self._tables.items():
                    remote.setdefault("tables", {}).setdefault(name, {})["cache"] = st.cache.stats()
            return remote
        ing = self._ingest
        out: dict[str, Any] = {"ready": self.ready(), "not_ready_reason": self.not_ready_reason()}
        if ing is not None:
            c = ing.counters
            elapsed = max(1e-9, time.monotonic() - c.started_at)
            out["ingest"] = {
                "messages": c.messages, "rows": c.rows, "markers": c.markers, "bytes": c.bytes,
                "batches": c.batches, "rows_per_s": c.rows / elapsed, "kafka_errors": c.kafka_errors,
                "fills_applied": c.fills_applied, "fills_dropped": c.fills_dropped,
                "dense_updates": c.dense_updates,
            }  # fmt: skip
            lat, rows = ing.latencies_rows()
            if lat.size:
                p50, p99 = row_quantiles(lat, rows, (0.5, 0.99))
                # publish -> visible to lookup, over rows (a message counts once per row)
                out["apply_latency_ms"] = {
                    "p50": p50 * 1e3,
                    "p99": p99 * 1e3,
                    "max": float(lat.max() * 1e3),
                    "samples": int(lat.size),
                    "rows": int(rows.sum()),
                }
        if ing is not None:
            # the messages the processor dead-letters, skipped here (streamhps.validation)
            out["rejected"] = ing.rejections()
        out["tables"] = {
            name: {
                "cache": st.cache.stats(),
                "window_rows": st.window.rows,
                "window_chunks": st.window.chunks,
                "window_bytes": st.window.nbytes,
                "rows_applied": st.rows,
                "messages": st.messages,
                "warmed_rows": self._warmed.get(name, 0),
            }
            for name, st in self._tables.items()
        }
        out["history_lost"] = list(self._tracker.history_lost)
        if self.sharded:
            out["shard"] = self.ownership.describe()
        out["stores"] = list(self.store_paths)
        with self._stats_lock:
            out["lookups"] = dict(self._lookup_counts)
        out["start_offsets"] = {f"{t}[{p}]": o for (t, p), o in self._start_offsets.items()}
        return out
