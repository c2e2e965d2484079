"""Worker ingest rate beside a raw consume of the same bytes; publish -> visible latency.

1. **Ingest ceiling**: publish N rows (dim D, fp32, P partitions) and commit. The ceiling is a
   raw ``confluent_kafka.Consumer`` (assign, batched ``consume``) reading every message of the
   topic, doing nothing with them. The worker run is ``InferenceWorker`` over an empty LMDB
   store tailing the same topic from the beginning: decode, validate, window, cache upsert,
   until every row is applied. Best of ``--repeats``. Target: worker >= 90 % of raw.
2. **Latency at half the max rate**: a fresh topic, a ready worker, and a publisher sending
   ``rate = 0.5 x worker max rows/s`` in 10 ms ticks for ``--seconds``. Reported: the worker's
   publish -> applied-in-cache latency of every message (its ``apply_latencies()``), and an
   outside probe that polls ``lookup`` for one key of a just-published batch until the new
   version shows (what a client sees; it polls every 1 ms). The publisher runs in its own
   process (its own GIL, as a trainer would), so the figures are the worker's; on a small
   machine it still shares the cores with the worker and the broker. Target: p99 <= 100 ms.
   ``--rate`` fixes the rate, to compare two builds on a machine whose load varies.

    python bench/staleness.py                        # embedded broker, CPU (numpy) cache
    python bench/staleness.py --device cuda --rows 2000000 --out bench/results/staleness-gpu.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from streamhps import Config, Publisher, wire
from streamhps.broker import EmbeddedBroker
from streamhps.store import LmdbStore
from streamhps.worker import InferenceWorker
from streamhps.worker.core import CONSUMER_DEFAULTS


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


def rows_of(keys: np.ndarray, version: int, dim: int) -> np.ndarray:
    v = np.random.default_rng(version).standard_normal((keys.shape[0], dim), dtype=np.float32)
    v[:, 0] = version
    return v


def raw_consume(bootstrap: str, topic: str, partitions: int, messages: int) -> tuple[float, int]:
    # the worker's own consumer settings, so the two read the same way
    c = Consumer(
        {**CONSUMER_DEFAULTS, "bootstrap.servers": bootstrap, "group.id": f"raw-{uuid.uuid4().hex}"}
    )
    c.list_topics(topic, timeout=10)
    t0 = time.perf_counter()
    c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
    n = nbytes = 0
    while n < messages:
        for m in c.consume(1024, timeout=1.0):
            if m.error() is None:
                n += 1
                nbytes += len(m.value())
    dt = time.perf_counter() - t0
    c.close()
    return dt, nbytes


def worker_ingest(cfg: Config, rows: int, device: str) -> tuple[float, dict[str, Any]]:
    w = InferenceWorker(cfg, empty_store(cfg), device=device)
    t0 = time.perf_counter()
    w.start()
    ing = w._ingest
    assert ing is not None
    while ing.counters.rows < rows:
        time.sleep(0.0005)
    dt = time.perf_counter() - t0
    stats = w.stats()
    w.stop()
    return dt, stats


def publish_at_rate(
    cfg: Config, rate: float, seconds: float, dim: int, keyspace: int, latest: Any, report: Any
) -> None:
    """In a child process (its own GIL, as a trainer would be): publish ``rate`` rows/s in 10 ms
    ticks; ``latest`` holds (version, one key, publish time) of the newest batch."""
    pub = Publisher.from_config(cfg)
    tick = 0.01
    per_tick = max(1, int(rate * tick))
    rng = np.random.default_rng(0)
    base = rows_of(np.arange(per_tick, dtype=np.int64), 1, dim)
    # connect and initialise the idempotent producer outside the measured run
    pub.publish("emb", np.arange(per_tick, dtype=np.int64), base, 1)
    pub.flush()
    time.sleep(0.5)
    sent = 0
    version = 2
    t_start = time.perf_counter()
    next_tick = t_start
    while time.perf_counter() - t_start < seconds:
        keys = rng.choice(keyspace, per_tick, replace=False).astype(np.int64)
        base[:, 0] = version
        published = time.time()
        pub.publish("emb", keys, base, version)
        latest[:] = [version, int(keys[0]), published]
        sent += per_tick
        version += 1
        next_tick += tick
        pause = next_tick - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
    elapsed = time.perf_counter() - t_start
    pub.commit(version)
    pub.close()
    report.put(sent / elapsed)


def latency_run(
    cfg: Config, rate: float, seconds: float, dim: int, keyspace: int, device: str
) -> dict[str, Any]:
    with Publisher.from_config(cfg) as pub:
        pub.create_topics()
    w = InferenceWorker(cfg, empty_store(cfg), device=device).start()
    w.wait_ready(60)
    ctx = mp.get_context("spawn")
    latest = ctx.Array("d", [0.0, 0.0, 0.0])
    report = ctx.Queue()
    proc = ctx.Process(
        target=publish_at_rate, args=(cfg, rate, seconds, dim, keyspace, latest, report)
    )
    probe_ms: list[float] = []
    proc.start()
    while proc.is_alive() and latest[0] == 0:  # the child's warm-up is not measured
        time.sleep(0.001)
    w.reset_latencies()
    seen = 0.0
    while proc.is_alive():
        version, key, published = latest[:]
        if version == seen:
            time.sleep(0.001)
            continue
        seen = version
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if w.lookup("emb", np.array([int(key)]))[0, 0] >= version:
                probe_ms.append((time.time() - published) * 1e3)
                break
            time.sleep(0.001)
        time.sleep(0.02)
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"the publisher process failed (exit code {proc.exitcode})")
    achieved = report.get(timeout=10)
    time.sleep(0.3)
    lat = w.apply_latencies() * 1e3
    stats = w.stats()
    w.stop()
    return {
        "target_rows_per_s": rate,
        "achieved_rows_per_s": achieved,
        "apply_p50_ms": float(np.percentile(lat, 50)),
        "apply_p99_ms": float(np.percentile(lat, 99)),
        "apply_max_ms": float(lat.max()),
        "apply_samples": int(lat.size),
        "probe_p50_ms": float(np.percentile(probe_ms, 50)) if probe_ms else None,
        "probe_p99_ms": float(np.percentile(probe_ms, 99)) if probe_ms else None,
        "probe_samples": len(probe_ms),
        "rejected": stats.get("rejected", {}).get("count", 0),
    }


def raw_latency_run(
    cfg: Config, rate: float, seconds: float, dim: int, keyspace: int
) -> dict[str, Any]:
    """The ceiling: a raw consumer (the worker's settings) receiving the same stream, latency
    from the publish timestamp in each message to its arrival, nothing applied."""
    with Publisher.from_config(cfg) as pub:
        pub.create_topics()
    c = Consumer(
        {
            **CONSUMER_DEFAULTS,
            "bootstrap.servers": cfg.bootstrap_servers,
            "group.id": f"raw-{uuid.uuid4().hex}",
        }
    )
    c.assign(
        [
            TopicPartition(cfg.topic("emb"), p, OFFSET_BEGINNING)
            for p in range(cfg.tables[0].partitions)
        ]
    )
    ctx = mp.get_context("spawn")
    latest = ctx.Array("d", [0.0, 0.0, 0.0])
    report = ctx.Queue()
    proc = ctx.Process(
        target=publish_at_rate, args=(cfg, rate, seconds, dim, keyspace, latest, report)
    )
    proc.start()
    lat: list[float] = []
    while proc.is_alive():
        for m in c.consume(1024, timeout=0.005):
            if m.error() is None and latest[0] > 0:
                lat.append(time.time() - wire.decode(m.value()).publish_time)
    proc.join()
    c.close()
    a = np.asarray(lat) * 1e3
    return {
        "p50_ms": float(np.percentile(a, 50)),
        "p99_ms": float(np.percentile(a, 99)),
        "samples": int(a.size),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument(
        "--rate",
        type=float,
        default=None,
        help="rows/s for the latency run (default: half the max)",
    )
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument(
        "--bootstrap", default=None, help="an existing broker (default: start the embedded one)"
    )
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "staleness.json"))
    args = ap.parse_args()

    broker = None
    bootstrap = args.bootstrap
    if bootstrap is None:
        broker = EmbeddedBroker(port=0).start()
        bootstrap = broker.bootstrap_servers
    try:
        cfg = make_config(bootstrap, args.dim, args.partitions, capacity=max(args.rows, 1 << 16))
        topic = cfg.topic("emb")
        with Publisher.from_config(cfg) as pub:
            pub.create_topics()
            keys = np.arange(args.rows, dtype=np.int64)
            pub.publish("emb", keys, rows_of(keys, 1, args.dim), 1)
            pub.commit(1)
            messages = pub.stats.messages
            total_bytes = pub.stats.bytes
        raw_s, raw_bytes = min(
            raw_consume(bootstrap, topic, args.partitions, messages) for _ in range(args.repeats)
        )
        runs = [worker_ingest(cfg, args.rows, args.device) for _ in range(args.repeats)]
        w_s, w_stats = min(runs, key=lambda r: r[0])
        ingest = {
            "rows": args.rows, "messages": messages, "bytes": total_bytes, "dim": args.dim,
            "partitions": args.partitions,
            "raw_consume_s": raw_s, "raw_MB_per_s": raw_bytes / raw_s / 1e6,
            "raw_rows_per_s": args.rows / raw_s,
            "worker_s": w_s, "worker_MB_per_s": total_bytes / w_s / 1e6,
            "worker_rows_per_s": args.rows / w_s, "worker_vs_raw": raw_s / w_s,
        }  # fmt: skip
        rate = args.rate or 0.5 * ingest["worker_rows_per_s"]
        lat_cfg = make_config(bootstrap, args.dim, args.partitions, capacity=1 << 20)
        latency = latency_run(
            lat_cfg, rate, args.seconds, args.dim, keyspace=1 << 20, device=args.device
        )
        raw_cfg = make_config(bootstrap, args.dim, args.partitions, capacity=1 << 16)
        latency["raw"] = raw_latency_run(raw_cfg, rate, args.seconds, args.dim, keyspace=1 << 20)
    finally:
        if broker is not None:
            broker.stop()

    print(f"\nworker ingest vs raw confluent-kafka consume ({args.rows} rows, dim {args.dim} fp32, "
          f"{args.partitions} partitions, {messages} messages, {total_bytes / 1e6:.1f} MB, {args.device})")  # fmt: skip
    print(f"{'':24}{'seconds':>10}{'MB/s':>10}{'rows/s':>14}")
    print(
        f"{'raw consume (ceiling)':24}{raw_s:>10.3f}{ingest['raw_MB_per_s']:>10.1f}{ingest['raw_rows_per_s']:>14,.0f}"
    )
    print(
        f"{'worker ingest':24}{w_s:>10.3f}{ingest['worker_MB_per_s']:>10.1f}{ingest['worker_rows_per_s']:>14,.0f}"
    )
    print(f"worker / raw = {ingest['worker_vs_raw']:.1%}   (target >= 90 %)")
    print(f"\npublish -> visible latency at {latency['achieved_rows_per_s']:,.0f} rows/s "
          f"(target rate {rate:,.0f} = half the worker max), {args.seconds:.0f} s")  # fmt: skip
    print(f"{'':24}{'p50 ms':>10}{'p99 ms':>10}{'samples':>10}")
    print(
        f"{'applied in cache':24}{latency['apply_p50_ms']:>10.1f}{latency['apply_p99_ms']:>10.1f}{latency['apply_samples']:>10}"
    )
    if latency["probe_samples"]:
        print(
            f"{'lookup probe':24}{latency['probe_p50_ms']:>10.1f}{latency['probe_p99_ms']:>10.1f}{latency['probe_samples']:>10}"
        )
    raw = latency["raw"]
    print(
        f"{'raw consume (ceiling)':24}{raw['p50_ms']:>10.1f}{raw['p99_ms']:>10.1f}{raw['samples']:>10}"
    )
    print("target: p99 <= 100 ms")
    result = {
        "benchmark": "staleness", "device": args.device, "machine": platform.platform(),
        "cpu_count": os.cpu_count(), "ingest": ingest, "latency": latency,
        "worker_stats_sample": {k: w_stats[k] for k in ("ingest",) if k in w_stats},
    }  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
