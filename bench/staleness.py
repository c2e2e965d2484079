"""Worker ingest beside a raw consume of the same bytes, and the latency-throughput curve.

1. **Ingest ceiling** (``ingest``). ``--rows`` rows (dim ``--dim`` fp32, ``--partitions``
   partitions) at version 1, then one *sentinel* row per partition at version 2 (the last row
   of every partition), then the commit markers. Both sides use the same consumer settings
   (``CONSUMER_DEFAULTS``), the same consume call as the worker's ingest loop
   (``consume_batch``), and the same start: ``assign`` from the beginning, clock started at the
   ``assign``. The raw consumer (a ``confluent_kafka.Consumer`` doing nothing with the bytes)
   stops when it has received every message. The worker (built and its cache allocated before
   the clock starts) stops when a probe polling ``lookup`` every millisecond sees every
   sentinel at version 2: the last row of every partition applied *and visible*, not a counter
   of consumed rows; it looks every 5 ms (each lookup takes the GIL from the thread it times;
   a 1 ms loop slowed the worker it measured). Best of ``--repeats``, interleaved. Target:
   worker >= 90 % of raw.

   The old version of this benchmark reported the cuda worker at 195 % of raw: its raw side
   called ``consume(1024, timeout=1.0)`` while the topic held ~270 messages, so librdkafka waited
   the whole second for a 1024-message batch that never came (every raw run was >= 1 s), and the
   worker's clock also started before ``start()`` while the raw clock started after a metadata
   warm-up. Same call and same start remove both.

2. **Curve** (``curve``). For each fraction of the raw-consume maximum (``--fractions``,
   default 10/25/50/75/90 %), in the same run: a publisher process (its own GIL, as a trainer)
   sends that many rows/s in 10 ms ticks for ``--seconds`` to a fresh topic, read by

   * the raw consumer: publish -> delivered latency of every message (the ceiling);
   * each ``--devices`` worker (cpu = numpy cache, cuda = CuPy cache, each with the default
     ``serving.ingest = "auto"``: a cpu worker ingests in a process of its own, a cuda worker on
     threads; cpu-thread, cpu-process, cuda-thread, cuda-process name the mode), ready and warm:
     publish -> visible of rows, from the worker's own record (``visible_latencies``: stamped
     when the rows are visible to ``lookup``, every message weighted by its rows) and from an
     outside probe that polls ``lookup`` for a key of the newest batch until its new version
     shows; and the p99 of ``lookup`` (1024 cached keys every 5 ms) while idle (before
     publishing; the probe's lookups run then too, so ingest is the only difference) and while
     ingesting.

   Targets: visible p99 <= raw p99 + 20 ms at every rate up to 50 %, <= 100 ms at 50 %; lookup
   p99 while ingesting at 50 % <= 1.5x idle. ``--profile`` adds the worker's per-stage time of
   the apply path (``Ingestor.profile``) at each point. ``--lookup-breakdown`` splits the
   lookup load's time into its wait for the cache's lock (which includes the GIL waits of the
   thread holding it, and its own after taking it; since 92c29ca no lookup takes it: the numpy
   cache's wait for its gate inside their compiled call, counted in the rest, and the cuda
   cache's request path enqueues without it, so the column reads 0 on both unless the code
   under test is older) and the rest, and runs a GIL probe thread
   (``time.sleep(0)`` every millisecond: how long a thread waits to get the GIL back).
   ``--piece-rows`` / ``--stage-rows`` change the stream writer's piece sizes (numpy / cuda).

Writes the JSON (``--out``) and an SVG plot of the curve beside it (same name, ``.svg``).

    python bench/staleness.py --devices cpu                 # embedded broker, 2-core machine
    python bench/staleness.py --devices cuda cpu --rows 1000000 --out $OUT/staleness.json
    python bench/staleness.py --devices cpu-thread cpu-process --fractions 0.1 0.25 0.5 --lookup-breakdown
    python bench/staleness.py --devices cuda-thread cuda-process --rows 1000000 --lookup-breakdown
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from streamhps import Config, Publisher, wire
from streamhps.broker import EmbeddedBroker
from streamhps.partitioning import partition_of
from streamhps.store import LmdbStore
from streamhps.worker import InferenceWorker, ingest
from streamhps.worker.core import CONSUMER_DEFAULTS
from streamhps.worker.ingest import BATCH_MESSAGES, POLL_TIMEOUT_S

LOOKUP_KEYS = 1 << 16  # keys seeded before a latency run; the lookup load reads these
LOOKUP_BATCH = 1024
BREAKDOWN = False  # --lookup-breakdown: the lookup load's lock waits and a GIL probe
PROBE_PERIOD_S = 0.005  # the ingest run's visibility probe


def make_config(bootstrap: str, dim: int, partitions: int, capacity: int) -> Config:
    return Config.from_dict(
        {
            "topic_prefix": f"bench{uuid.uuid4().hex[:8]}",
            "kafka": {"bootstrap.servers": bootstrap},
            "tables": [{"name": "emb", "dim": dim, "partitions": partitions, "missing": "zeros"}],
            "serving": {
                "max_staleness_s": 5.0,
                "cache_capacity": capacity,
                "warm_from_store": False,
            },
        }
    )


def empty_store(cfg: Config) -> str:
    d = tempfile.mkdtemp(prefix="streamhps-bench-store-")
    with LmdbStore.open(d, readonly=False) as st:
        st.ensure_tables({t.name: t for t in cfg.tables})
    return d


def rows_of(n: int, version: int, dim: int) -> np.ndarray:
    v = np.random.default_rng(version).standard_normal((n, dim), dtype=np.float32)
    v[:, 0] = version  # column 0 carries the version: a probe reads it back through lookup
    return v


def raw_consumer(bootstrap: str) -> Consumer:
    """A consumer with the worker's settings, connected (metadata fetched) before any clock."""
    c = Consumer(
        {**CONSUMER_DEFAULTS, "bootstrap.servers": bootstrap, "group.id": f"raw-{uuid.uuid4().hex}"}
    )
    c.list_topics(timeout=10)
    return c


def sentinel_keys(first: int, partitions: int) -> np.ndarray:
    """One key per partition, all >= ``first`` (outside the bulk rows), in partition order."""
    cand = np.arange(first, first + 64 * partitions, dtype=np.int64)
    part = partition_of(cand, partitions)
    return np.array([cand[part == p][0] for p in range(partitions)], dtype=np.int64)


# ---------------------------------------------------------------- 1. ingest ceiling


def raw_consume(bootstrap: str, topic: str, partitions: int, messages: int) -> float:
    c = raw_consumer(bootstrap)
    t0 = time.perf_counter()
    c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
    n = 0
    while n < messages:
        for m in ingest.consume_batch(c, BATCH_MESSAGES, POLL_TIMEOUT_S):
            if m.error() is None:
                n += 1
    dt = time.perf_counter() - t0
    c.close()
    return dt


def make_worker(cfg: Config, device: str) -> InferenceWorker:
    """``cpu`` or ``cuda`` (``serving.ingest = "auto"``), or the mode named: ``cpu-thread``,
    ``cpu-process``, ``cuda-thread``, ``cuda-process`` (in a child the bench's
    ``--piece-rows``, ``--switch-interval`` and consumer overrides do not reach the ingest)."""
    dev, _, mode = device.partition("-")
    return InferenceWorker(cfg, empty_store(cfg), device=dev, ingest=mode or None)


def worker_ingest(cfg: Config, sentinels: np.ndarray, device: str) -> dict[str, Any]:
    w = make_worker(cfg, device)
    w.start()
    t0 = w.assigned_at
    assert t0 is not None
    while True:  # the probe: every sentinel (last row of its partition) visible at version 2
        if bool((w.lookup("emb", sentinels)[:, 0] >= 2).all()):
            t_visible = time.perf_counter()
            break
        # Every PROBE_PERIOD_S: a lookup takes the GIL from the ingest thread it is timing, so
        # a tighter loop slows what it measures (resolution: this period).
        time.sleep(PROBE_PERIOD_S)
    stats = w.stats()
    profile = w.ingest_profile()
    w.stop()
    return {"seconds": t_visible - t0, "stats": stats.get("ingest", {}), "profile": profile}


def ingest_ceiling(
    bootstrap: str, rows: int, dim: int, partitions: int, devices: list[str], repeats: int
) -> dict[str, Any]:
    cfg = make_config(bootstrap, dim, partitions, capacity=max(2 * rows, 1 << 16))
    sentinels = sentinel_keys(rows, partitions)
    with Publisher.from_config(cfg) as pub:
        pub.create_topics()
        keys = np.arange(rows, dtype=np.int64)
        pub.publish("emb", keys, rows_of(rows, 1, dim), 1)
        pub.publish("emb", sentinels, rows_of(partitions, 2, dim), 2)
        pub.commit(2)
        messages, nbytes = pub.stats.messages, pub.stats.bytes
    raw: list[float] = []
    runs: dict[str, list[dict[str, Any]]] = {d: [] for d in devices}
    for _ in range(repeats):  # interleaved: the machine's load drifts
        raw.append(raw_consume(bootstrap, cfg.topic("emb"), partitions, messages))
        for d in devices:
            runs[d].append(worker_ingest(cfg, sentinels, d))
    raw_s = min(raw)
    out: dict[str, Any] = {
        "rows": rows + partitions, "messages": messages, "bytes": nbytes, "dim": dim,
        "partitions": partitions, "consume_call": [BATCH_MESSAGES, POLL_TIMEOUT_S],
        "raw_s": raw_s, "raw_all_s": raw, "raw_rows_per_s": rows / raw_s,
        "raw_MB_per_s": nbytes / raw_s / 1e6, "workers": {},
    }  # fmt: skip
    for d, rs in runs.items():
        best = min(rs, key=lambda r: r["seconds"])
        out["workers"][d] = {
            "seconds": best["seconds"], "all_s": [r["seconds"] for r in rs],
            "rows_per_s": rows / best["seconds"], "MB_per_s": nbytes / best["seconds"] / 1e6,
            "vs_raw": raw_s / best["seconds"], "profile": best["profile"],
        }  # fmt: skip
    return out


# ---------------------------------------------------------------- 2. the curve


def publish_at_rate(
    cfg: Config, rate: float, seconds: float, dim: int, keyspace: int, latest: Any, report: Any
) -> None:
    """In a child process: publish ``rate`` rows/s in 10 ms ticks for ``seconds``; ``latest``
    holds (version, one key, publish time) of the newest batch."""
    pub = Publisher.from_config(cfg)
    tick = 0.01
    per_tick = max(1, int(rate * tick))
    perm = np.random.default_rng(0).permutation(keyspace).astype(np.int64)
    # version 2: above the seed rows' committed version 1 (the publisher refuses to go below it)
    base = rows_of(per_tick, 2, dim)
    pub.publish("emb", perm[:per_tick], base, 2)  # connect and get the idempotent PID first
    pub.flush()
    time.sleep(0.3)
    sent, version, i = 0, 3, 0
    t_start = time.perf_counter()
    next_tick = t_start
    while time.perf_counter() - t_start < seconds:
        lo = (i * per_tick) % (keyspace - per_tick)
        keys = perm[lo : lo + per_tick]
        base[:, 0] = version
        published = time.time()
        pub.publish("emb", keys, base, version)
        latest[:] = [version, int(keys[0]), published]
        sent += per_tick
        version += 1
        i += 1
        next_tick += tick
        pause = next_tick - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
    elapsed = time.perf_counter() - t_start
    pub.commit(version)
    pub.close()
    report.put((sent / elapsed, version - 3))


def _start_publisher(
    cfg: Config, rate: float, seconds: float, dim: int, keyspace: int
) -> tuple[Any, Any, Any]:
    ctx = mp.get_context("spawn")
    latest = ctx.Array("d", [0.0, 0.0, 0.0])
    report = ctx.Queue()
    proc = ctx.Process(
        target=publish_at_rate, args=(cfg, rate, seconds, dim, keyspace, latest, report)
    )
    proc.start()
    return proc, latest, report


def _finish_publisher(proc: Any, report: Any) -> tuple[float, int]:
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"the publisher process failed (exit code {proc.exitcode})")
    achieved, ticks = report.get(timeout=10)
    return float(achieved), int(ticks)


def _pct(a: Any, q: float) -> float | None:
    a = np.asarray(a, dtype=np.float64)
    return float(np.percentile(a, q)) if a.size else None


def raw_latency_run(cfg: Config, rate: float, seconds: float, keyspace: int) -> dict[str, Any]:
    """The ceiling: publish -> delivered of every message to a raw consumer, nothing applied."""
    with Publisher.from_config(cfg) as pub:
        pub.create_topics()
    c = raw_consumer(cfg.bootstrap_servers)
    parts = cfg.tables[0].partitions
    c.assign([TopicPartition(cfg.topic("emb"), p, OFFSET_BEGINNING) for p in range(parts)])
    proc, latest, report = _start_publisher(cfg, rate, seconds, cfg.tables[0].dim, keyspace)
    lat: list[float] = []
    while proc.is_alive():
        for m in ingest.consume_batch(c, BATCH_MESSAGES, POLL_TIMEOUT_S):
            if m.error() is None:
                now = time.time()
                msg = wire.decode(m.value())
                if msg.version >= 2 and msg.row_count:
                    lat.append(now - msg.publish_time)
    achieved, _ = _finish_publisher(proc, report)
    c.close()
    a = np.asarray(lat) * 1e3
    return {"achieved_rows_per_s": achieved, "p50_ms": _pct(a, 50), "p99_ms": _pct(a, 99),
            "samples": int(a.size)}  # fmt: skip


class LookupLoad(threading.Thread):
    """``lookup`` of LOOKUP_BATCH cached keys every ``interval`` s; latencies per phase. With
    ``breakdown``, also each lookup's wait for the cache's lock (the table's ``_lock`` wrapped
    by :class:`TimedLock`), so that what remains is the lookup's own work plus its waits for
    the GIL (and, on cuda, for the device stream)."""

    def __init__(
        self, w: InferenceWorker, interval: float = 0.005, breakdown: bool = False
    ) -> None:
        super().__init__(daemon=True)
        self.w, self.interval = w, interval
        self.phase = "idle"
        self.samples: dict[str, list[float]] = {"idle": [], "ingest": []}
        self.lock_wait: dict[str, list[float]] = {"idle": [], "ingest": []}
        self.stop_ = threading.Event()
        self.timed: TimedLock | None = None
        if breakdown:
            cache = w._tables["emb"].cache
            self.timed = TimedLock(cache._lock, self)
            cache._lock = self.timed  # type: ignore[assignment]

    def run(self) -> None:
        rng = np.random.default_rng(7)
        while not self.stop_.is_set():
            keys = rng.integers(0, LOOKUP_KEYS, LOOKUP_BATCH)
            if self.timed is not None:
                self.timed.waited = 0.0
            t0 = time.perf_counter()
            self.w.lookup("emb", keys)
            self.samples[self.phase].append(time.perf_counter() - t0)
            if self.timed is not None:
                self.lock_wait[self.phase].append(self.timed.waited)
            time.sleep(self.interval)


class TimedLock:
    """A cache's lock, timing how long ``owner``'s thread waits to take it (bench only)."""

    def __init__(self, lock: Any, owner: threading.Thread) -> None:
        self._l, self._owner, self.waited = lock, owner, 0.0

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if threading.current_thread() is not self._owner:
            return self._l.acquire(blocking, timeout)
        t0 = time.perf_counter()
        got = self._l.acquire(blocking, timeout)
        self.waited += time.perf_counter() - t0
        return got

    def release(self) -> None:
        self._l.release()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self._l.release()


class GilProbe(threading.Thread):
    """How long a thread waits to get the GIL back: ``time.sleep(0)`` releases it and asks for
    it again, every millisecond; samples per phase (bench only)."""

    def __init__(self, load: LookupLoad) -> None:
        super().__init__(daemon=True)
        self.load = load
        self.samples: dict[str, list[float]] = {"idle": [], "ingest": []}

    def run(self) -> None:
        while not self.load.stop_.is_set():
            t0 = time.perf_counter()
            time.sleep(0)
            self.samples[self.load.phase].append(time.perf_counter() - t0)
            time.sleep(0.001)


def worker_latency_run(
    cfg: Config, rate: float, seconds: float, keyspace: int, device: str, profile: bool
) -> dict[str, Any]:
    with Publisher.from_config(cfg) as pub:
        pub.create_topics()
        seed = np.arange(LOOKUP_KEYS, dtype=np.int64)
        pub.publish("emb", seed, rows_of(LOOKUP_KEYS, 1, cfg.tables[0].dim), 1)
        pub.commit(1)
    w = make_worker(cfg, device).start()
    try:
        w.wait_ready(60)
        t0 = time.perf_counter()  # the first miss of the process may compile device code
        w.lookup("emb", np.array([keyspace + 1]))
        first_miss_ms = (time.perf_counter() - t0) * 1e3
        deadline = time.monotonic() + 60
        while w.stats()["ingest"]["rows"] < LOOKUP_KEYS and time.monotonic() < deadline:
            time.sleep(0.01)
        load = LookupLoad(w, breakdown=BREAKDOWN)
        load.start()
        gil = GilProbe(load) if BREAKDOWN else None
        if gil is not None:
            gil.start()
        # Idle: the lookup load beside the probe's own lookups (a key every millisecond), so
        # that ingest is the only difference between the idle and the ingest samples.
        t_idle = time.monotonic() + 1.0
        while time.monotonic() < t_idle:
            w.lookup("emb", np.array([int(seed[0])]))
            time.sleep(0.001)
        proc, latest, report = _start_publisher(cfg, rate, seconds, cfg.tables[0].dim, keyspace)
        while proc.is_alive() and latest[0] == 0:  # the child's warm-up is not measured
            time.sleep(0.001)
        w.reset_latencies()
        w.reset_ingest_profile()
        load.phase = "ingest"
        probe_ms: list[float] = []
        seen = 0.0
        while proc.is_alive():
            version, key, published = latest[:]
            if version == seen:
                time.sleep(0.001)
                continue
            seen = version
            t_end = time.monotonic() + 5
            while time.monotonic() < t_end:
                if w.lookup("emb", np.array([int(key)]))[0, 0] >= version:
                    probe_ms.append((time.time() - published) * 1e3)
                    break
                time.sleep(0.001)
            time.sleep(0.005)
        achieved, _ = _finish_publisher(proc, report)
        load.stop_.set()
        load.join()
        time.sleep(0.2)
        vis, weights = w.visible_latencies()
        prof = w.ingest_profile()
        split = prof.pop("latency_split", {})
        stats = w.stats()
    finally:
        w.stop()
    vis_ms = vis * 1e3
    idle = np.asarray(load.samples["idle"]) * 1e3
    busy = np.asarray(load.samples["ingest"]) * 1e3
    return {
        "achieved_rows_per_s": achieved,
        "visible_p50_ms": _wpct(vis_ms, weights, 50),
        "visible_p99_ms": _wpct(vis_ms, weights, 99),
        "visible_max_ms": float(vis_ms.max()) if vis_ms.size else None,
        "visible_messages": int(vis_ms.size),
        "probe_p50_ms": _pct(probe_ms, 50),
        "probe_p99_ms": _pct(probe_ms, 99),
        "probe_samples": len(probe_ms),
        "lookup_idle_p99_ms": _pct(idle, 99),
        "lookup_ingest_p99_ms": _pct(busy, 99),
        "lookup_idle_p50_ms": _pct(idle, 50),
        "lookup_ingest_p50_ms": _pct(busy, 50),
        "lookup_samples": [int(idle.size), int(busy.size)],
        "rejected": stats.get("rejected", {}).get("count", 0),
        "first_miss_lookup_ms": first_miss_ms,
        "lookup_breakdown": _breakdown(load, gil) if gil is not None else None,
        "split": split,
        "profile": prof if profile else None,
    }


def _breakdown(load: LookupLoad, gil: GilProbe) -> dict[str, Any]:
    """Per phase: lookup p50/p99, its lock wait p50/p99, the rest (lookup minus lock wait)
    p50/p99, and the GIL probe's wait p50/p99/max (ms)."""
    out: dict[str, Any] = {}
    for ph in ("idle", "ingest"):
        tot = np.asarray(load.samples[ph]) * 1e3
        lw = np.asarray(load.lock_wait[ph][: tot.size]) * 1e3
        g = np.asarray(gil.samples[ph]) * 1e3
        rest = tot[: lw.size] - lw
        out[ph] = {
            "lookup": [_pct(tot, 50), _pct(tot, 99)], "lock_wait": [_pct(lw, 50), _pct(lw, 99)],
            "rest": [_pct(rest, 50), _pct(rest, 99)],
            "gil": [_pct(g, 50), _pct(g, 99), float(g.max()) if g.size else None],
        }  # fmt: skip
    return out


def _wpct(x: np.ndarray, w: np.ndarray, q: float) -> float | None:
    """Weighted percentile (each message's latency counts once per row it carried)."""
    if x.size == 0:
        return None
    o = np.argsort(x)
    cw = np.cumsum(w[o].astype(np.float64))
    i = int(np.searchsorted(cw, q / 100 * cw[-1]))
    return float(x[o][min(i, x.size - 1)])


def curve(
    bootstrap: str, dim: int, partitions: int, raw_max: float, fractions: list[float],
    devices: list[str], seconds: float, profile: bool,
) -> list[dict[str, Any]]:  # fmt: skip
    keyspace = 1 << 20
    points = []
    for f in fractions:
        rate = f * raw_max
        point: dict[str, Any] = {"fraction": f, "target_rows_per_s": rate}
        point["raw"] = raw_latency_run(
            make_config(bootstrap, dim, partitions, 1 << 16), rate, seconds, keyspace
        )
        for d in devices:
            point[d] = worker_latency_run(
                make_config(bootstrap, dim, partitions, 1 << 21), rate, seconds, keyspace, d,
                profile,
            )  # fmt: skip
        points.append(point)
        _print_point(point, devices)
    return points


# ---------------------------------------------------------------- output


def _f(x: Any, fmt: str = ".1f") -> str:
    return "-" if x is None else format(x, fmt)


def _print_point(p: dict[str, Any], devices: list[str]) -> None:
    raw = p["raw"]
    print(f"  {p['fraction']:>4.0%} raw: {raw['achieved_rows_per_s']:>10,.0f} rows/s  "
          f"p50 {_f(raw['p50_ms'])} p99 {_f(raw['p99_ms'])} ms", flush=True)  # fmt: skip
    for d in devices:
        r = p[d]
        print(f"       {d:>4}: {r['achieved_rows_per_s']:>10,.0f} rows/s  visible p50 "
              f"{_f(r['visible_p50_ms'])} p99 {_f(r['visible_p99_ms'])}  probe p99 "
              f"{_f(r['probe_p99_ms'])}  lookup p99 idle {_f(r['lookup_idle_p99_ms'], '.2f')} "
              f"ingest {_f(r['lookup_ingest_p99_ms'], '.2f')} ms", flush=True)  # fmt: skip
        b = r.get("lookup_breakdown")
        for ph in ("idle", "ingest") if b else ():
            x = b[ph]
            print(f"             {ph:>6} lookup p50/p99 {_f(x['lookup'][0], '.2f')} / "
                  f"{_f(x['lookup'][1], '.2f')}  lock wait {_f(x['lock_wait'][0], '.2f')} / "
                  f"{_f(x['lock_wait'][1], '.2f')}  rest {_f(x['rest'][0], '.2f')} / "
                  f"{_f(x['rest'][1], '.2f')}  GIL probe p50/p99/max {_f(x['gil'][0], '.3f')} / "
                  f"{_f(x['gil'][1], '.3f')} / {_f(x['gil'][2], '.2f')} ms", flush=True)  # fmt: skip


def print_tables(res: dict[str, Any]) -> None:
    ing = res["ingest"]
    print(f"\nworker ingest vs raw consume ({ing['rows']:,} rows, dim {ing['dim']} fp32, "
          f"{ing['partitions']} partitions, {ing['messages']} messages, {ing['bytes'] / 1e6:.1f} MB; "
          f"consume({ing['consume_call'][0]}, timeout={ing['consume_call'][1]}) on both sides)")  # fmt: skip
    print("| side | seconds | MB/s | rows/s | vs raw |\n|---|---|---|---|---|")
    print(f"| raw consume (ceiling) | {ing['raw_s']:.3f} | {ing['raw_MB_per_s']:.0f} | "
          f"{ing['raw_rows_per_s']:,.0f} | 100 % |")  # fmt: skip
    for d, w in ing["workers"].items():
        print(f"| {d} worker, last row visible | {w['seconds']:.3f} | {w['MB_per_s']:.0f} | "
              f"{w['rows_per_s']:,.0f} | {w['vs_raw']:.0%} |")  # fmt: skip
    print("target: worker >= 90 % of raw")
    print(
        "\npublish -> visible (ms) beside the raw consumer's publish -> delivered at the same rate"
    )
    devs = res["devices"]
    head = "| % of raw max | rows/s (raw run) | raw p50 / p99 |"
    for d in devs:
        head += f" {d} rows/s | {d} visible p50 / p99 | {d} probe p50 / p99 | {d} lookup p99 idle / ingest |"
    print(head)
    print("|" + "---|" * (3 + 4 * len(devs)))
    for p in res["curve"]:
        raw = p["raw"]
        line = (f"| {p['fraction']:.0%} | {raw['achieved_rows_per_s']:,.0f} | "
                f"{_f(raw['p50_ms'])} / {_f(raw['p99_ms'])} |")  # fmt: skip
        for d in devs:
            r = p[d]
            line += (f" {r['achieved_rows_per_s']:,.0f} | {_f(r['visible_p50_ms'])} / "
                     f"{_f(r['visible_p99_ms'])} | {_f(r['probe_p50_ms'])} / {_f(r['probe_p99_ms'])} | "
                     f"{_f(r['lookup_idle_p99_ms'], '.2f')} / {_f(r['lookup_ingest_p99_ms'], '.2f')} |")  # fmt: skip
        print(line)
    print("targets: visible p99 <= raw p99 + 20 ms up to 50 %, <= 100 ms at 50 %; "
          "lookup p99 ingesting at 50 % <= 1.5x idle")  # fmt: skip
    print("\nwhere publish -> visible goes (ms, per row): publish -> returned by consume() | "
          "consume() -> visible (the ingest round)")  # fmt: skip
    print("| % of raw max | raw p50 / p99 |"
          + "".join(f" {d} consumed p50 / p99 | {d} apply p50 / p99 / max |" for d in devs))  # fmt: skip
    print("|" + "---|" * (2 + 2 * len(devs)))
    for p in res["curve"]:
        line = f"| {p['fraction']:.0%} | {_f(p['raw']['p50_ms'])} / {_f(p['raw']['p99_ms'])} |"
        for d in devs:
            sp = p[d].get("split") or {}
            line += (f" {_f(sp.get('consumed_p50_ms'))} / {_f(sp.get('consumed_p99_ms'))} | "
                     f"{_f(sp.get('apply_p50_ms'))} / {_f(sp.get('apply_p99_ms'))} / "
                     f"{_f(sp.get('apply_max_ms'))} |")  # fmt: skip
        print(line)
    for p in res["curve"]:
        for d in devs:
            prof = p[d].get("profile")
            if prof:
                print(f"\napply-path profile, {d} worker at {p['fraction']:.0%} "
                      f"({p[d]['achieved_rows_per_s']:,.0f} rows/s)")  # fmt: skip
                print_profile(prof)


def print_profile(prof: dict[str, Any]) -> None:
    wall = max(prof.get("wall_s", 0.0), 1e-9)
    rows = max(prof.get("rows", 0), 1)
    longest = prof.get("longest", {})
    print("| stage | seconds | % of its thread's wall | us per 1k rows | longest pass, ms |\n"
          "|---|---|---|---|---|")  # fmt: skip
    for k, v in prof["stages"].items():
        if v:
            print(f"| {k} | {v:.3f} | {v / wall:.1%} | {v / rows * 1e9:.1f} | "
                  f"{longest.get(k, 0.0) * 1e3:.1f} |")  # fmt: skip
    print(f"| (wall, {prof.get('rows', 0):,} rows in {prof.get('batches', 0)} applies) | "
          f"{wall:.3f} | | | |")  # fmt: skip


def write_svg(res: dict[str, Any], path: Path) -> None:
    """Latency (ms) against achieved rows/s: raw and each worker, p50 dashed, p99 solid."""
    W, H, L, R, T, B = 720, 440, 70, 170, 40, 55
    pts = res["curve"]
    series: list[tuple[str, str, str, list[tuple[float, float]]]] = []
    colors = {"raw": "#444444", "cpu": "#1f77b4", "cuda": "#2ca02c"}
    for name in ["raw", *res["devices"]]:
        for q, dash in (("p99", ""), ("p50", "5,4")):
            xy = []
            for p in pts:
                r = p[name]
                y = r[f"{q}_ms"] if name == "raw" else r[f"visible_{q}_ms"]
                if y is not None:
                    xy.append((r["achieved_rows_per_s"], y))
            label = f"{name} {'delivered' if name == 'raw' else 'visible'} {q}"
            series.append((label, colors.get(name, "#d62728"), dash, xy))
    xs = [x for *_, xy in series for x, _ in xy] or [1.0]
    ys = [y for *_, xy in series for _, y in xy] or [1.0]
    xmax, ymax = max(xs) * 1.05, max(ys) * 1.1

    def sx(x: float) -> float:
        return L + x / xmax * (W - L - R)

    def sy(y: float) -> float:
        return H - B - y / ymax * (H - T - B)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{L}" y="22" font-size="14">publish &#8594; visible vs rate: '
           f'{res["machine_label"]}</text>']  # fmt: skip
    for i in range(6):
        y = ymax * i / 5
        out.append(f'<line x1="{L}" x2="{W - R}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{L - 6}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:.0f}</text>')
        x = xmax * i / 5
        out.append(
            f'<text x="{sx(x):.1f}" y="{H - B + 18}" text-anchor="middle">{x / 1e3:,.0f}k</text>'
        )
    out.append(f'<line x1="{L}" x2="{L}" y1="{T}" y2="{H - B}" stroke="black"/>')
    out.append(f'<line x1="{L}" x2="{W - R}" y1="{H - B}" y2="{H - B}" stroke="black"/>')
    out.append(
        f'<text x="{(L + W - R) / 2}" y="{H - 12}" text-anchor="middle">rows/s published</text>'
    )
    out.append(f'<text x="16" y="{(T + H - B) / 2}" transform="rotate(-90 16 {(T + H - B) / 2})" '
               f'text-anchor="middle">latency ms</text>')  # fmt: skip
    for i, (label, color, dash, xy) in enumerate(series):
        if xy:
            d = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in xy)
            out.append(f'<polyline points="{d}" fill="none" stroke="{color}" stroke-width="2" '
                       f'stroke-dasharray="{dash}"/>')  # fmt: skip
            for x, y in xy:
                out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{color}"/>')
        ly = T + 10 + 18 * i
        out.append(f'<line x1="{W - R + 12}" x2="{W - R + 40}" y1="{ly}" y2="{ly}" stroke="{color}" '
                   f'stroke-width="2" stroke-dasharray="{dash}"/>')  # fmt: skip
        out.append(f'<text x="{W - R + 46}" y="{ly + 4}">{label}</text>')
    out.append("</svg>")
    path.write_text("\n".join(out))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=4.0, help="publishing time per curve point")
    ap.add_argument(
        "--devices",
        nargs="+",
        default=["cpu"],
        choices=["cpu", "cuda", "cpu-thread", "cpu-process", "cuda-thread", "cuda-process"],
    )
    ap.add_argument("--fractions", nargs="+", type=float, default=[0.1, 0.25, 0.5, 0.75, 0.9])
    ap.add_argument(
        "--raw-max", type=float, default=None,
        help="rows/s to take as the raw maximum instead of measuring it (skips the ingest part)",
    )  # fmt: skip
    ap.add_argument("--profile", action="store_true", help="per-stage apply time at each point")
    ap.add_argument(
        "--bootstrap", default=None, help="an existing broker (default: start the embedded one)"
    )
    ap.add_argument("--label", default=None, help="machine name for the plot title")
    # ablations: put one fix of issue 9 back as it was, to measure what it buys
    ap.add_argument("--sync-writes", action="store_true", help="cuda: synchronous upserts")
    ap.add_argument("--single-consume", action="store_true", help="one consume(n, timeout) call")
    ap.add_argument("--fetch-wait-ms", type=int, default=None, help="fetch.wait.max.ms, both sides")
    ap.add_argument(
        "--switch-interval", type=float, default=None,
        help="sys.setswitchinterval for this process (seconds; Python's default is 0.005)",
    )  # fmt: skip
    ap.add_argument(
        "--lookup-breakdown", action="store_true",
        help="time the lookup load's waits for the cache lock, and a GIL probe thread's waits",
    )  # fmt: skip
    ap.add_argument("--piece-rows", type=int, default=None,
                    help="rows per locked piece of a stream write (EmbeddingCache.write_piece_rows)")  # fmt: skip
    ap.add_argument("--cuda-piece-rows", type=int, default=None,
                    help="cuda: rows of a stream write enqueued at once (CudaCache.write_piece_rows)")  # fmt: skip
    ap.add_argument("--stage-rows", type=int, default=None,
                    help="cuda: rows per staged host -> device copy (cuda_backend.STAGE_ROWS)")  # fmt: skip
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "staleness.json"))
    args = ap.parse_args()

    global BREAKDOWN
    BREAKDOWN = args.lookup_breakdown
    if args.piece_rows is not None:
        from streamhps.cache.base import EmbeddingCache

        EmbeddingCache.write_piece_rows = args.piece_rows
    if args.cuda_piece_rows is not None:
        from streamhps.cache.cuda_backend import CudaCache

        CudaCache.write_piece_rows = args.cuda_piece_rows
    if args.stage_rows is not None:
        from streamhps.cache import cuda_backend

        cuda_backend.STAGE_ROWS = args.stage_rows

    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)

    if args.sync_writes:
        from streamhps.cache.base import EmbeddingCache
        from streamhps.cache.cuda_backend import CudaCache

        CudaCache.upsert_async = EmbeddingCache.upsert_async  # type: ignore[method-assign]
        CudaCache.write_piece_rows = 1 << 30
    if args.single_consume:

        def consume_once(
            consumer: Any, max_messages: int, timeout: float, bite: int | None = None
        ) -> list[Any]:
            return list(consumer.consume(num_messages=max_messages, timeout=timeout))

        ingest.consume_batch = consume_once
    if args.fetch_wait_ms is not None:
        CONSUMER_DEFAULTS["fetch.wait.max.ms"] = args.fetch_wait_ms
    broker = None
    bootstrap = args.bootstrap
    if bootstrap is None:
        broker = EmbeddedBroker(port=0).start()
        bootstrap = broker.bootstrap_servers
    res: dict[str, Any] = {
        "benchmark": "staleness", "devices": args.devices, "machine": platform.platform(),
        "cpu_count": os.cpu_count(), "machine_label": args.label or f"{os.cpu_count()} cores",
        "args": vars(args),
    }  # fmt: skip
    try:
        if args.raw_max is None:
            res["ingest"] = ingest_ceiling(
                bootstrap, args.rows, args.dim, args.partitions, args.devices, args.repeats
            )
            raw_max = res["ingest"]["raw_rows_per_s"]
        else:
            raw_max = args.raw_max
        res["raw_max_rows_per_s"] = raw_max
        print(f"raw-consume maximum {raw_max:,.0f} rows/s; curve points:", flush=True)
        res["curve"] = curve(
            bootstrap, args.dim, args.partitions, raw_max, args.fractions, args.devices,
            args.seconds, args.profile,
        )  # fmt: skip
    finally:
        if broker is not None:
            broker.stop()
    if "ingest" not in res:
        res["ingest"] = {"rows": 0, "dim": args.dim, "partitions": args.partitions, "messages": 0,
                         "bytes": 0, "consume_call": [BATCH_MESSAGES, POLL_TIMEOUT_S],
                         "raw_s": 0, "raw_MB_per_s": 0, "raw_rows_per_s": raw_max, "workers": {}}  # fmt: skip
    print_tables(res)
    for d, w in res["ingest"]["workers"].items():
        if w.get("profile"):
            print(f"\napply-path profile, {d} worker, ingest run (best)")
            print_profile(w["profile"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    write_svg(res, out.with_suffix(".svg"))
    print(f"\nwrote {out} and {out.with_suffix('.svg')}")


if __name__ == "__main__":
    main()
