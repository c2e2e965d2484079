"""Which step of a worker's ingest holds the GIL, and for how long, one step at a time.

A lookup beside ingest waits for the GIL (``bench/staleness.py --lookup-breakdown``: on the
H200 a probe thread's p99 wait for it grows from ~0.2 ms idle to 1-1.6 ms at 50 % load, and a
cpu lookup's wait for the cache lock carries the same waits of the writer holding it). Here
the main thread runs one step of the ingest path in a loop, alone, while a pure-Python thread
(the stand-in for a request thread) records the gaps between its loop iterations; its longest
gaps are how long the step kept it from the GIL. Steps, on the shapes of
``bench/staleness.py`` (dim 64 fp32, ~960 KB messages of 3 636 rows, batches of 64 k rows):
``consume`` of one prefetched 960 KB message (embedded broker), ``check_table_message``
(decode + checks), ``latest_rows`` (the dedup sort of a batch), ``window.add``, the numpy
cache's ``upsert_async`` of a batch (compiled pieces of ``write_piece_rows``), and a 1 024-key
``lookup``. Ceiling: the same probe with the main thread asleep. Switch interval 0.1 ms, as a
worker sets it.

    python bench/gil_holders.py [--seconds 0.5] [--out bench/results/gil_holders.json]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from consume_gil import Gaps
from report import write_json

from streamhps import wire
from streamhps.broker import EmbeddedBroker
from streamhps.cache import make_cache
from streamhps.config import TableSpec
from streamhps.partitioning import partition_of
from streamhps.validation import check_table_message
from streamhps.worker.window import RecentRows, latest_rows

DIM, ROWS_PER_MESSAGE, BATCH = 64, 3636, 1 << 16
HELD_MS = 0.05  # a probe gap longer than this is time the probe could not run


def timed(step: Callable[[], Any], seconds: float) -> dict[str, float | int | None]:
    """Run ``step`` in a loop for ``seconds`` beside a :class:`Gaps` probe."""
    step()  # compiled or loaded before the clock
    probe = Gaps()
    probe.start()
    time.sleep(0.02)
    calls, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
        calls += 1
    wall = time.perf_counter() - t0
    g = np.asarray(probe.gaps[1:]) * 1e3
    probe.stop.set()
    probe.join()
    held = g[g > HELD_MS]
    return {"calls": calls, "ms_per_call": wall / calls * 1e3,
            "held_share": float(held.sum() / (wall * 1e3)), "held_p99_ms": _p(held, 99),
            "held_max_ms": float(g.max())}  # fmt: skip


def _p(a: np.ndarray, q: float) -> float | None:
    return float(np.percentile(a, q)) if a.size else None


consumers: list[Consumer] = []


def consume_step(bootstrap: str, payload: bytes, messages: int) -> Callable[[], Any]:
    """One ``consume(1)`` of a prefetched backlog of ``messages`` copies of ``payload``."""
    topic = f"gil-{uuid.uuid4().hex[:8]}"
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5,
                  "message.max.bytes": len(payload) + 4096})  # fmt: skip
    for _ in range(messages):
        p.produce(topic, payload, partition=0)
    p.flush(60)
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": uuid.uuid4().hex,
                  "enable.auto.commit": False, "fetch.max.bytes": 1 << 28,
                  "max.partition.fetch.bytes": 1 << 27})  # fmt: skip
    consumers.append(c)
    c.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    c.consume(1, 10.0)
    time.sleep(1.0)  # librdkafka prefetches the backlog (up to 64 MB) meanwhile

    def step() -> Any:
        got = c.consume(1, 0.0)
        if not got:  # drained: seek back, the backlog is fetched again
            c.seek(TopicPartition(topic, 0, 0))
        return got

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=0.5, help="per step")
    ap.add_argument("--out", default="bench/results/gil_holders.json")
    args = ap.parse_args()
    sys.setswitchinterval(0.0001)  # as a worker sets it (serving.switch_interval_ms)
    rng = np.random.default_rng(0)
    spec = TableSpec(name="emb", dim=DIM, partitions=4)
    k = rng.integers(0, 1 << 40, 8 * ROWS_PER_MESSAGE)
    k = k[partition_of(k, 4) == 1][:ROWS_PER_MESSAGE]
    payload = wire.encode_update(
        "emb", k, rng.standard_normal((k.size, DIM), dtype=np.float32), 5, partition=1
    )
    keys = rng.permutation(1 << 21)[:BATCH].astype(np.int64)
    versions = np.ones(BATCH, dtype=np.int64)
    vectors = rng.standard_normal((BATCH, DIM), dtype=np.float32)
    cache = make_cache("numpy", 1 << 21, DIM)
    ver = [1]

    def upsert() -> None:
        ver[0] += 1
        cache.upsert_async(keys, vectors, np.full(BATCH, ver[0], dtype=np.int64))

    window = RecentRows(DIM, np.dtype(np.float32), 4)
    parts, offs = np.zeros(BATCH, dtype=np.int32), np.zeros(BATCH, dtype=np.int64)
    sel = latest_rows(keys, versions)

    def window_add() -> None:
        window.add(keys[sel], versions[sel], vectors[sel], parts, offs)
        window._chunks = ()  # each add into an empty window: no merge cost accumulates

    upsert()
    lookup_keys = keys[:1024].copy()
    broker = EmbeddedBroker(port=0).start()
    try:
        steps: dict[str, Callable[[], Any]] = {
            "nothing (ceiling)": lambda: time.sleep(0.001),
            f"consume(1) of a {len(payload) / 1e3:.0f} KB message": consume_step(
                broker.bootstrap_servers, payload, 60
            ),
            "check_table_message (decode + checks)": lambda: check_table_message(
                payload, spec, 1, {"emb"}
            ),
            f"latest_rows of {BATCH:,} rows": lambda: latest_rows(keys, versions),
            f"window.add of {BATCH:,} rows": window_add,
            f"numpy cache upsert_async of {BATCH:,} rows": upsert,
            "numpy cache lookup of 1,024 keys": lambda: cache.lookup(lookup_keys),
        }
        res = {name: timed(step, args.seconds) for name, step in steps.items()}
        for c in consumers:
            c.close()
    finally:
        broker.stop()
    print("a pure-Python thread's gaps while the main thread loops on one step "
          "(switch interval 0.1 ms)")  # fmt: skip
    print(f"| step | ms per call | probe kept out (gaps > {HELD_MS} ms), share of wall | "
          "p99 of those gaps, ms | longest gap, ms |")  # fmt: skip
    print("|---|---|---|---|---|")
    for name, r in res.items():
        print(f"| {name} | {r['ms_per_call']:.3f} | {r['held_share']:.1%} | "
              f"{'-' if r['held_p99_ms'] is None else format(r['held_p99_ms'], '.3f')} | "
              f"{r['held_max_ms']:.2f} |")  # fmt: skip
    write_json(args.out, {"benchmark": "gil_holders", "machine": platform.node(),
                          "args": vars(args), "steps": res})  # fmt: skip


if __name__ == "__main__":
    main()
