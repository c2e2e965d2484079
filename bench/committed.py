"""What a restarted trainer pays to learn the committed versions, beside a raw read of the tail.

A new ``Publisher`` reads each table's highest committed version back from the commit markers
before its first publish (``streamhps/committed.py``). Cases: a topic whose last commit is
complete (the markers are the last message of every partition), and one whose tail holds
uncommitted rows of a crashed run (many small messages after the last markers). The ceiling
is a raw confluent-kafka consumer that knows where the markers are: it is assigned at the last
marker of every partition and reads to the end (list topics + watermarks + one fetch), which
is the least any reader must do.

    python bench/committed.py                      # embedded broker, 8 partitions
    python bench/committed.py --partitions 32 --bootstrap 127.0.0.1:9092
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import uuid
from pathlib import Path

import numpy as np
from confluent_kafka import Consumer, KafkaError, TopicPartition
from confluent_kafka.admin import AdminClient

from streamhps import Publisher, TableSpec
from streamhps.broker import EmbeddedBroker


def build(bootstrap: str, spec: TableSpec, commits: int, tail_messages: int) -> tuple[str, dict]:
    """A topic with ``commits`` commits and ``tail_messages`` uncommitted messages after them;
    returns the prefix and the offset of the last marker of each partition."""
    prefix = f"bc{uuid.uuid4().hex[:8]}"
    with Publisher(bootstrap, [spec], prefix, learn_committed=False) as pub:
        pub.create_topics()
        for v in range(1, commits + 1):
            pub.publish("emb", np.arange(4000), np.ones((4000, spec.dim), np.float32), version=v)
            pub.commit(v)
    c = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": "bench", "enable.partition.eof": True}
    )
    ends = {}
    for p in range(spec.partitions):
        ends[p] = c.get_watermark_offsets(TopicPartition(f"{prefix}.emb", p), timeout=10)[1]
    c.close()
    if tail_messages:
        rows = 3 * tail_messages  # 3 rows of dim 64 fit a 2000-byte message
        with Publisher(
            bootstrap, [spec], prefix, learn_committed=False, max_message_bytes=2000
        ) as pub:
            pub.publish(
                "emb", np.arange(rows), np.ones((rows, spec.dim), np.float32), version=commits + 1
            )
    # the embedded broker can list a watermark one batch short: the last marker is at or after it
    return prefix, {p: max(0, e - 1) for p, e in ends.items()}


def raw_tail(bootstrap: str, topic: str, markers: dict[int, int]) -> float:
    t0 = time.perf_counter()
    AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10)
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"raw-{uuid.uuid4().hex[:8]}",
                  "enable.partition.eof": True, "fetch.wait.max.ms": 10})  # fmt: skip
    for p in markers:
        c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
    c.assign([TopicPartition(topic, p, o) for p, o in markers.items()])
    pending = set(markers)
    while pending:
        for m in c.consume(256, 0.05):
            err = m.error()
            if err is not None and err.code() == KafkaError._PARTITION_EOF:
                pending.discard(m.partition())
    c.close()
    return time.perf_counter() - t0


def learn(bootstrap: str, spec: TableSpec, prefix: str, expect: int) -> float:
    t0 = time.perf_counter()
    got = Publisher(bootstrap, [spec], prefix).committed_version("emb")
    dt = time.perf_counter() - t0
    assert got == expect, (got, expect)
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bootstrap", default=None)
    ap.add_argument("--partitions", type=int, default=8)
    ap.add_argument("--commits", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default="bench/results/committed.json")
    args = ap.parse_args()
    broker = None
    bootstrap = args.bootstrap
    if bootstrap is None:
        broker = EmbeddedBroker(port=0).start()
        bootstrap = broker.bootstrap_servers
    spec = TableSpec("emb", dim=64, partitions=args.partitions)
    results = []
    try:
        for tail in (0, 500, 2000):
            prefix, markers = build(bootstrap, spec, args.commits, tail)
            ours = [learn(bootstrap, spec, prefix, args.commits) for _ in range(args.repeats)]
            raw = [raw_tail(bootstrap, f"{prefix}.emb", markers) for _ in range(args.repeats)]
            results.append({
                "partitions": args.partitions, "commits": args.commits, "tail_messages": tail,
                "learn_ms_median": 1e3 * statistics.median(ours), "learn_ms_max": 1e3 * max(ours),
                "raw_tail_ms_median": 1e3 * statistics.median(raw),
            })  # fmt: skip
    finally:
        if broker is not None:
            broker.stop()
    hdr = f"{'partitions':>10} {'uncommitted msgs':>16} {'learn ms (median/max)':>22} {'raw tail read ms':>17}"
    print(
        f"\nLearning the committed version on start, {args.commits} commits, {args.repeats} runs each"
    )
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        print(f"{r['partitions']:>10} {r['tail_messages']:>16} "
              f"{r['learn_ms_median']:>13.0f} / {r['learn_ms_max']:<6.0f} {r['raw_tail_ms_median']:>17.0f}")  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"bench": "committed", "host": platform.node(), "results": results}, indent=2)
    )
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
