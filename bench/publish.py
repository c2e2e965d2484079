"""Publisher throughput beside a raw confluent-kafka producer sending the same bytes.

For each (dim, dtype): time ``Publisher.publish`` + ``flush`` of N rows over P partitions, then
a raw ``confluent_kafka.Producer`` producing the very messages the publisher built (pre-encoded,
same partitions, same producer settings) + ``flush``. The raw run is the ceiling: it does no
validation, partitioning or encoding. Target: publisher >= 80 % of raw.

    python bench/publish.py                       # embedded broker, 200k rows per case
    python bench/publish.py --rows 500000 --bootstrap 127.0.0.1:9092
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import Producer

from streamhps import Publisher, TableSpec, wire
from streamhps.broker import EmbeddedBroker
from streamhps.kafka import PRODUCER_DEFAULTS


def raw_produce(bootstrap: str, topic: str, messages: list[tuple[int, bytes]]) -> float:
    prod = Producer({**PRODUCER_DEFAULTS, "bootstrap.servers": bootstrap})
    warm_up(prod, topic)
    t0 = time.perf_counter()
    for p, payload in messages:
        while True:
            try:
                prod.produce(topic, payload, partition=p)
                break
            except BufferError:
                prod.poll(0.05)
        prod.poll(0)
    if prod.flush(60):
        raise RuntimeError("raw producer did not flush")
    return time.perf_counter() - t0


def warm_up(prod: Producer, topic: str) -> None:
    """Connect, fetch metadata and acquire the idempotent producer id outside the timed region:
    one small message to the table's .dlq topic, flushed (done for both sides)."""
    prod.list_topics(topic, timeout=10)
    prod.produce(f"{topic}.dlq", b"warm-up", partition=0)
    if prod.flush(10):
        raise RuntimeError("warm-up message was not acknowledged")


def capture_messages(
    spec: TableSpec, keys: np.ndarray, vectors: np.ndarray
) -> list[tuple[int, bytes]]:
    """The exact (partition, bytes) the publisher produces, captured without a broker."""
    pub = Publisher("127.0.0.1:1", [spec], "capture", learn_committed=False)
    out: list[tuple[int, bytes]] = []

    def capture(topic: str, partition: int, payload: Any, *, rows: int) -> None:
        out.append((partition, payload))

    pub._produce = capture  # type: ignore[method-assign]
    pub.publish(spec.name, keys, vectors, version=1)
    return out


def run_case(
    bootstrap: str, dim: int, dtype: str, rows: int, partitions: int, repeats: int
) -> dict:
    spec = TableSpec("emb", dim=dim, dtype=dtype, partitions=partitions)
    rng = np.random.default_rng(dim)
    keys = rng.choice(2**40, size=rows, replace=False).astype(np.int64)
    vectors = rng.standard_normal((rows, dim)).astype(dtype)
    messages = capture_messages(spec, keys, vectors)
    nbytes = sum(len(m) for _, m in messages)
    pub_times, raw_times = [], []
    for r in range(repeats):
        prefix = f"bench{uuid.uuid4().hex[:8]}"
        with Publisher(bootstrap, [spec], prefix) as pub:
            pub.create_topics()
            warm_up(pub._producer, f"{prefix}.emb")  # same warm-up as the raw run
            if r % 2:  # alternate which goes first, so drift on a shared machine hits both
                raw_times.append(raw_produce(bootstrap, f"{prefix}.emb", messages))
            t0 = time.perf_counter()
            pub.publish("emb", keys, vectors, version=r + 1)
            pub.flush()
            pub_times.append(time.perf_counter() - t0)
        if not r % 2:
            raw_times.append(raw_produce(bootstrap, f"{prefix}.emb", messages))
    pub_t, raw_t = float(np.median(pub_times)), float(np.median(raw_times))
    return {
        "dim": dim, "dtype": dtype, "rows": rows, "partitions": partitions, "messages": len(messages),
        "bytes": nbytes, "publisher_rows_per_s": rows / pub_t, "publisher_MB_per_s": nbytes / pub_t / 1e6,
        "raw_rows_per_s": rows / raw_t, "raw_MB_per_s": nbytes / raw_t / 1e6, "ratio": raw_t / pub_t,
        "publisher_s": pub_times, "raw_s": raw_times,
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--bootstrap", default=None, help="existing cluster (default: embedded broker)")
    ap.add_argument("--out", default="bench/results/publish.json")
    args = ap.parse_args()

    broker = None
    bootstrap = args.bootstrap
    if not bootstrap:
        broker = EmbeddedBroker(port=0).start()
        bootstrap = broker.bootstrap_servers
    try:
        results = [
            run_case(bootstrap, dim, dtype, args.rows, args.partitions, args.repeats)
            for dim in (64, 128)
            for dtype in ("float32", "float16")
        ]
    finally:
        if broker:
            broker.stop()

    print(f"\nPublisher vs raw confluent-kafka producer, {args.rows} rows, {args.partitions} partitions, "
          f"median of {args.repeats}, broker {'embedded Tansu' if broker else bootstrap}")  # fmt: skip
    hdr = f"{'dim':>4} {'dtype':>8} {'msgs':>5} {'pub Mrows/s':>12} {'pub MB/s':>9} {'raw Mrows/s':>12} {'raw MB/s':>9} {'pub/raw':>8}"
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        print(f"{r['dim']:>4} {r['dtype']:>8} {r['messages']:>5} {r['publisher_rows_per_s'] / 1e6:>12.3f} "
              f"{r['publisher_MB_per_s']:>9.1f} {r['raw_rows_per_s'] / 1e6:>12.3f} {r['raw_MB_per_s']:>9.1f} "
              f"{r['ratio']:>7.0%}")  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"bench": "publish", "host": platform.node(), "target_ratio": 0.8,
                               "max_message_bytes": wire.MAX_MESSAGE_BYTES, "results": results}, indent=2))  # fmt: skip
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
