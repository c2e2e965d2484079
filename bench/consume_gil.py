"""How long one ``consume`` call holds the GIL while it returns a backlog, by messages per call.

confluent-kafka's ``Consumer.consume`` waits for messages with the GIL released, then builds
the returned list (one ``bytes`` copy of every payload) with the GIL held. A worker catching up
on a backlog of large messages (the embedding stream's are ~1 MB) therefore held every request
thread of its process for as long as one call took to copy tens of MB. The worker now takes
``FETCH_BITE_BYTES`` of payload per call (``streamhps.worker.ingest.consume_batch``'s
``bite``). Measured here: a pure-Python thread records the gaps between its loop iterations
while the main thread drains a prefetched backlog, once with ``consume(1024)`` (the old call)
and once in the worker's bites; the ceiling is the same thread's longest gap with nothing
else running. Embedded broker, one partition, ``--messages`` of ``--message-bytes``.

    python bench/consume_gil.py [--messages 60] [--message-bytes 960000] [--out bench/results/consume_gil.json]
"""

from __future__ import annotations

import argparse
import platform
import sys
import threading
import time
import uuid
from typing import Any

import numpy as np
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from report import write_json

from streamhps.broker import EmbeddedBroker
from streamhps.worker.ingest import BATCH_MESSAGES, FETCH_BITE_BYTES, consume_batch


class Gaps(threading.Thread):
    """A pure-Python loop: its longest gap between two iterations is how long it could not
    get the GIL (or the CPU)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.gaps: list[float] = []

    def run(self) -> None:
        last = time.perf_counter()
        while not self.stop.is_set():
            now = time.perf_counter()
            self.gaps.append(now - last)
            last = now

    def finish(self) -> dict[str, float]:
        self.stop.set()
        self.join()
        g = np.asarray(self.gaps) * 1e3
        return {"max_ms": float(g.max()), "p999_ms": float(np.percentile(g, 99.9))}


def drain(bootstrap: str, topic: str, messages: int, bite: int | None) -> dict[str, Any]:
    c = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": uuid.uuid4().hex, "enable.auto.commit": False,
         "fetch.max.bytes": 1 << 28, "max.partition.fetch.bytes": 1 << 27}
    )  # fmt: skip
    try:
        c.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        got = len(c.consume(1, 10.0))
        time.sleep(2.0)  # librdkafka prefetches the backlog meanwhile
        gaps = Gaps()
        gaps.start()
        time.sleep(0.05)
        rounds, t0 = 0, time.perf_counter()
        while got < messages:
            batch = consume_batch(c, BATCH_MESSAGES, 1.0, bite)
            rounds += 1
            if not batch:
                break
            got += len(batch)
        seconds = time.perf_counter() - t0
        return {"bite": bite or BATCH_MESSAGES, "messages": got, "rounds": rounds,
                "seconds": seconds, **gaps.finish()}  # fmt: skip
    finally:
        c.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=60)
    ap.add_argument("--message-bytes", type=int, default=960_000)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--out", default="bench/results/consume_gil.json")
    args = ap.parse_args()
    sys.setswitchinterval(0.0001)  # as a worker sets it (serving.switch_interval_ms)
    bite = max(1, FETCH_BITE_BYTES // args.message_bytes)
    broker = EmbeddedBroker(port=0).start()
    try:
        topic = f"gil-{uuid.uuid4().hex[:8]}"
        p = Producer({"bootstrap.servers": broker.bootstrap_servers, "linger.ms": 5,
                      "message.max.bytes": args.message_bytes + 4096})  # fmt: skip
        payload = bytes(args.message_bytes)
        for _ in range(args.messages):
            p.produce(topic, payload, partition=0)
        p.flush(60)
        idle = Gaps()
        idle.start()
        time.sleep(0.5)
        ceiling = idle.finish()
        runs = [
            drain(broker.bootstrap_servers, topic, args.messages, b)
            for _ in range(args.repeat)
            for b in (None, bite)
        ]
    finally:
        broker.stop()
    print(f"{args.messages} messages of {args.message_bytes:,} B drained from a prefetched "
          f"backlog; a pure-Python thread's longest gap (switch interval 0.1 ms)")  # fmt: skip
    print("| messages per consume call | rounds | drain ms | longest gap ms | p99.9 gap ms |")
    print("|---|---|---|---|---|")
    print(f"| nothing running (ceiling) | - | - | {ceiling['max_ms']:.2f} | "
          f"{ceiling['p999_ms']:.3f} |")  # fmt: skip
    for r in runs:
        print(f"| {r['bite']} | {r['rounds']} | {r['seconds'] * 1e3:.0f} | {r['max_ms']:.2f} | "
              f"{r['p999_ms']:.3f} |")  # fmt: skip
    write_json(args.out, {"benchmark": "consume_gil", "machine": platform.node(),
                          "args": vars(args), "fetch_bite_bytes": FETCH_BITE_BYTES,
                          "ceiling": ceiling, "runs": runs})  # fmt: skip


if __name__ == "__main__":
    main()
