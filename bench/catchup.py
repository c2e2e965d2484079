"""A worker catching up on a backlog: how long it takes, and what its lookups see meanwhile.

What a restarted or newly started worker meets: the stream holds ``--rows`` rows it has not
consumed. Measured per device: seconds from ``start()`` until every row is applied, beside
a raw consumer reading the same messages (the ceiling: same consume call and settings); and
the p50/p99/max of 1 024-key ``lookup`` calls every 2 ms while it catches up, beside the same
lookups once it has caught up (the ceiling). The cache's compiled code is loaded before the
clock starts (a worker does it once per process, at start). Embedded broker, dim 64 fp32.

    python bench/catchup.py [--rows 400000] [--devices cpu] [--repeat 3] [--out bench/results/catchup.json]
"""

from __future__ import annotations

import argparse
import platform
import threading
import time
from typing import Any

import numpy as np
from report import write_json
from staleness import empty_store, make_config, raw_consume, rows_of

from streamhps import Config, Publisher
from streamhps.broker import EmbeddedBroker
from streamhps.cache import make_cache
from streamhps.worker import InferenceWorker

LOOKUP_KEYS = 1024
LOOKUP_EVERY_S = 0.002


class Lookups(threading.Thread):
    """``lookup`` of LOOKUP_KEYS random backlog keys every LOOKUP_EVERY_S; latencies."""

    def __init__(self, w: InferenceWorker, keyspace: int) -> None:
        super().__init__(daemon=True)
        self.w, self.keyspace = w, keyspace
        self.stop = threading.Event()
        self.seconds: list[float] = []

    def run(self) -> None:
        rng = np.random.default_rng(1)
        while not self.stop.is_set():
            keys = rng.integers(0, self.keyspace, LOOKUP_KEYS)
            t = time.perf_counter()
            self.w.lookup("emb", keys)
            self.seconds.append(time.perf_counter() - t)
            time.sleep(LOOKUP_EVERY_S)

    def finish(self) -> dict[str, float]:
        self.stop.set()
        self.join()
        ms = np.asarray(self.seconds) * 1e3
        return {
            "n": int(ms.size),
            "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)),
            "max_ms": float(ms.max()),
        }


def catch_up(cfg: Config, rows: int, device: str) -> dict[str, Any]:
    w = InferenceWorker(cfg, empty_store(cfg), device=device)
    t0 = time.perf_counter()
    w.start()
    load = Lookups(w, rows)
    load.start()  # lookups before the first rows land miss and read zeros: still timed
    while w.stats()["ingest"]["rows"] < rows:
        if time.perf_counter() - t0 > 120:
            raise RuntimeError(f"worker did not catch up on {rows} rows in 120 s")
        time.sleep(0.002)
    seconds = time.perf_counter() - t0
    during = load.finish()
    idle = Lookups(w, rows)
    idle.start()
    time.sleep(max(0.3, seconds))
    after = idle.finish()
    w.stop()
    return {"seconds": seconds, "rows_per_s": rows / seconds, "during": during, "after": after}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=400_000)
    ap.add_argument("--devices", nargs="+", default=["cpu"], choices=["cpu", "cuda"])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default="bench/results/catchup.json")
    args = ap.parse_args()
    make_cache("numpy", capacity=1024, dim=64)  # the compiled kernels, loaded before any clock
    broker = EmbeddedBroker(port=0).start()
    results: dict[str, Any] = {"benchmark": "catchup", "machine": platform.node(),
                               "args": vars(args), "raw_s": [], "devices": {}}  # fmt: skip
    try:
        cfg = make_config(broker.bootstrap_servers, 64, 4, 1 << 21)
        with Publisher.from_config(cfg) as pub:
            pub.create_topics()
            keys = np.arange(args.rows, dtype=np.int64)
            for lo in range(0, args.rows, 50_000):
                k = keys[lo : lo + 50_000]
                pub.publish("emb", k, rows_of(k.shape[0], 1, 64), 1)
            pub.commit(1)
            messages = pub.stats.messages  # markers included: raw_consume counts every message
        topic = cfg.topic("emb")
        for d in args.devices:
            results["devices"][d] = []
        for _ in range(args.repeat):
            results["raw_s"].append(raw_consume(broker.bootstrap_servers, topic, 4, messages))
            for d in args.devices:
                results["devices"][d].append(catch_up(cfg, args.rows, d))
    finally:
        broker.stop()
    raw = min(results["raw_s"])
    print(f"catching up on {args.rows:,} rows (dim 64 fp32, 4 partitions); best of {args.repeat}")
    print("| side | seconds | rows/s | lookup p50 / p99 / max ms during | after (ceiling) |")
    print("|---|---|---|---|---|")
    print(f"| raw consume (ceiling) | {raw:.3f} | {args.rows / raw:,.0f} | - | - |")
    for d, runs in results["devices"].items():
        for r in runs:
            a, b = r["during"], r["after"]
            print(f"| {d} worker | {r['seconds']:.3f} | {r['rows_per_s']:,.0f} | "
                  f"{a['p50_ms']:.2f} / {a['p99_ms']:.2f} / {a['max_ms']:.2f} | "
                  f"{b['p50_ms']:.2f} / {b['p99_ms']:.2f} / {b['max_ms']:.2f} |")  # fmt: skip
    write_json(args.out, results)


if __name__ == "__main__":
    main()
