"""What a lookup that misses the cache costs, with the ingest on threads or in a process of its own.

A cpu worker (``serving.ingest = "thread"`` and ``"process"``, one after the other, on the
embedded broker) consumes ``--rows`` rows that its cache does not take (``insert_on_update =
false``, no warm-up) and that no processor has written to LMDB: a lookup of them misses the
cache and finds them in the worker's window of recent rows, which lives in the ingest process
in ``"process"`` mode (one request there and back). Timed: ``lookup`` of ``--keys`` such keys
(a fresh set each time, so that the read-through fill of one lookup does not turn the next into
hits), against the ceiling of the same lookup of keys the cache holds, in the same worker.
Then ``--threads`` threads at once, each looking up 256 fresh missed keys at a time: lookups
per second of all of them (in ``"process"`` mode over ``DATA_CONNECTIONS`` connections to the
child, and over one, as before they were pooled). Also ``start()`` and ``stop()`` of a worker
in each mode (the ingest process's start-up cost; the thread mode is its ceiling).

    python bench/miss_path.py [--rows 400000] [--keys 16 256 4096] [--threads 8] [--out bench/results/miss_path.json]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from report import write_json

from streamhps import Config, Publisher
from streamhps.broker import EmbeddedBroker
from streamhps.store import LmdbStore
from streamhps.worker import InferenceWorker, ingest_process

DIM = 64


def config(bootstrap: str, rows: int) -> Config:
    return Config.from_dict(
        {
            "topic_prefix": f"miss{uuid.uuid4().hex[:8]}",
            "kafka": {"bootstrap.servers": bootstrap},
            "tables": [
                {
                    "name": "emb",
                    "dim": DIM,
                    "partitions": 4,
                    "missing": "zeros",
                    "insert_on_update": False,
                }
            ],  # fmt: skip
            "serving": {"cache_capacity": 4 * rows, "warm_from_store": False},
        }
    )


def timed(w: InferenceWorker, key_sets: list[np.ndarray]) -> np.ndarray:
    out = np.empty(len(key_sets))
    for i, k in enumerate(key_sets):
        t0 = time.perf_counter()
        w.lookup("emb", k)
        out[i] = time.perf_counter() - t0
    return out * 1e3


def concurrent(w: InferenceWorker, key_sets: list[np.ndarray], threads: int) -> float:
    """Lookups per second of ``threads`` threads sharing ``key_sets``."""
    parts = [key_sets[i::threads] for i in range(threads)]

    def run(sets: list[np.ndarray]) -> None:
        for k in sets:
            w.lookup("emb", k)

    ts = [threading.Thread(target=run, args=(p,)) for p in parts]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return len(key_sets) / (time.perf_counter() - t0)


def run_mode(
    cfg: Config, mode: str, rows: int, sizes: list[int], reps: int, threads: int
) -> dict[str, Any]:
    store = tempfile.mkdtemp(prefix="miss-store-")
    with LmdbStore.open(store, readonly=False) as st:
        st.ensure_tables({t.name: t for t in cfg.tables})
    rng = np.random.default_rng(3)
    out: dict[str, Any] = {}
    with InferenceWorker(cfg, store, ingest=mode) as w:
        w.wait_ready(60)
        deadline = time.monotonic() + 60
        while w.stats()["tables"]["emb"]["window_rows"] < rows and time.monotonic() < deadline:
            time.sleep(0.05)
        hot = np.arange(1024, dtype=np.int64) + 10 * rows  # made resident: the ceiling
        w._tables["emb"].cache.upsert(
            hot, np.ones((1024, DIM), np.float32), np.ones(1024, np.int64)
        )
        cold = rng.permutation(rows).astype(np.int64)
        used = 0
        for n in sizes:
            if used + n * reps > rows:
                raise SystemExit(f"--rows {rows} too few for {reps} x {n} fresh keys")
            misses = [cold[used + i * n : used + (i + 1) * n] for i in range(reps)]
            used += n * reps
            hits = [rng.choice(hot, n) for _ in range(reps)]
            timed(w, hits[:5])
            miss_ms, hit_ms = timed(w, misses), timed(w, hits)
            got = w.lookup("emb", misses[0])
            assert (got[:, 0] == 1).all(), "a missed key did not come from the window"
            out[str(n)] = {
                "miss_p50_ms": float(np.percentile(miss_ms, 50)),
                "miss_p99_ms": float(np.percentile(miss_ms, 99)),
                "hit_p50_ms": float(np.percentile(hit_ms, 50)),
                "hit_p99_ms": float(np.percentile(hit_ms, 99)),
            }
        left = cold[used:]
        sets = [left[i : i + 256] for i in range(0, left.shape[0] - 255, 256)][: 40 * threads]
        out["concurrent"] = {"threads": threads, "lookups": len(sets), "keys": 256,
                             "lookups_per_s": concurrent(w, sets, threads)}  # fmt: skip
        s = w.stats()["lookups"]
        out["from_window"] = s["from_window"]
    return out


def start_stop(cfg: Config, mode: str, repeats: int = 3) -> dict[str, float]:
    """Seconds of ``start()`` (empty store and topics, a small cache: what the mode adds, not
    the page faults of a large table, which both pay; the process mode's includes the child's
    start) and of ``stop()``, the fastest of ``repeats`` (the first start of a process loads the
    compiled kernels)."""
    store = tempfile.mkdtemp(prefix="miss-store-")
    with LmdbStore.open(store, readonly=False) as st:
        st.ensure_tables({t.name: t for t in cfg.tables})
    starts, stops = [], []
    for _ in range(repeats):
        w = InferenceWorker(cfg, store, ingest=mode, warm_from_store=False)
        t0 = time.perf_counter()
        w.start()
        t1 = time.perf_counter()
        w.stop()
        starts.append(t1 - t0)
        stops.append(time.perf_counter() - t1)
    return {"start_s": min(starts), "stop_s": min(stops)}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rows", type=int, default=400_000)
    ap.add_argument("--keys", type=int, nargs="+", default=[16, 256, 4096])
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "miss_path.json"))
    args = ap.parse_args()
    broker = EmbeddedBroker(port=0).start()
    try:
        cfg = config(broker.bootstrap_servers, args.rows)
        with Publisher.from_config(cfg) as pub:
            pub.create_topics()
            keys = np.arange(args.rows, dtype=np.int64)
            vec = np.zeros((args.rows, DIM), np.float32)
            vec[:, 0] = 1
            pub.publish("emb", keys, vec, 1)
            pub.commit(1)
        res: dict[str, Any] = {
            "benchmark": "miss_path", "machine": platform.platform(), "cpu_count": os.cpu_count(),
            "args": vars(args), "modes": {},
        }  # fmt: skip
        pooled = ingest_process.DATA_CONNECTIONS
        small = config(broker.bootstrap_servers, 16_384)  # empty topics, a 64 k-row cache
        res["start_stop"] = {m: start_stop(small, m) for m in ("thread", "process")}
        for name, mode, conns in (("thread", "thread", pooled), ("process", "process", pooled),
                                  ("process-1-connection", "process", 1)):  # fmt: skip
            print(f"ingest = {mode!r} ({name}) ...", flush=True)
            ingest_process.DATA_CONNECTIONS = conns
            res["modes"][name] = run_mode(cfg, mode, args.rows, args.keys, args.reps, args.threads)
        ingest_process.DATA_CONNECTIONS = pooled
    finally:
        broker.stop()
    print("\nlookup of keys the cache misses (rows from the window) vs keys it holds (ms)")
    print("| keys | ingest | miss p50 / p99 | hit p50 / p99 (ceiling) | miss p50 / hit p50 |")
    print("|---|---|---|---|---|")
    for n in map(str, args.keys):
        for mode, r in list(res["modes"].items())[:2]:
            x = r[n]
            print(f"| {n} | {mode} | {x['miss_p50_ms']:.2f} / {x['miss_p99_ms']:.2f} | "
                  f"{x['hit_p50_ms']:.2f} / {x['hit_p99_ms']:.2f} | "
                  f"{x['miss_p50_ms'] / x['hit_p50_ms']:.1f}x |")  # fmt: skip
    print("\nworker start() and stop(), s (fastest of 3; the thread mode is the ceiling)")
    print("| ingest | start | stop |")
    print("|---|---|---|")
    for mode, r in res["start_stop"].items():
        print(f"| {mode} | {r['start_s']:.2f} | {r['stop_s']:.2f} |")
    print(f"\n{args.threads} threads at once, 256 missed keys per lookup")
    print("| ingest | lookups/s | vs thread |")
    print("|---|---|---|")
    base = res["modes"]["thread"]["concurrent"]["lookups_per_s"]
    for mode, r in res["modes"].items():
        c = r["concurrent"]["lookups_per_s"]
        print(f"| {mode} | {c:,.0f} | {c / base:.2f}x |")
    write_json(args.out, res)


if __name__ == "__main__":
    main()
