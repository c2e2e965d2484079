"""Inference-server throughput and latency beside the in-process worker it wraps.

One table (100k rows, dim 64 fp32) is published, applied by the processor and held in the
worker's cache; then, for each batch size, the same random keys are looked up:

* ``in-process``: ``InferenceWorker.lookup`` called directly (the ceiling: no HTTP, no encoding);
* ``http binary``: ``InferenceClient.lookup(binary=True)`` (int64 keys in, raw rows out);
* ``http json``:   ``InferenceClient.lookup(binary=False)``;
* ``http floor``:  ``GET /healthz`` round trips, the cost of one request on this HTTP stack.

Predict (DLRM head, batch 512) is compared with the same worker lookups + numpy forward
in-process. One client thread; keep-alive connections.

    python bench/serving.py                     # embedded broker; writes bench/results/serving.json
    python bench/serving.py --seconds 3 --out /tmp/serving.json
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from servers.app import InferenceServer
from servers.model import DenseModel
from streamhps import Config, Publisher
from streamhps.broker import EmbeddedBroker
from streamhps.client import InferenceClient
from streamhps.testing import start_processor, stop_processor, wait_for_applied_version
from streamhps.worker import InferenceWorker

ROWS = 100_000
DIM = 64


def timed(fn: Callable[[], Any], seconds: float) -> tuple[int, np.ndarray]:
    fn()  # warm
    lat = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        fn()
        lat.append(time.perf_counter() - t0)
    return len(lat), np.asarray(lat)


def row(case: str, batch: int, n: int, lat: np.ndarray, ceiling: float | None) -> dict[str, Any]:
    keys_s = batch * n / lat.sum()
    return {
        "case": case, "batch": batch, "requests": n, "keys_per_s": keys_s,
        "p50_ms": float(np.percentile(lat, 50) * 1e3), "p99_ms": float(np.percentile(lat, 99) * 1e3),
        "pct_of_in_process": None if ceiling is None else 100 * keys_s / ceiling,
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0, help="per case")
    ap.add_argument("--bootstrap", default=None, help="existing broker (default: embedded)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "serving.json"))
    args = ap.parse_args()

    broker = None if args.bootstrap else EmbeddedBroker(port=0).start()
    bootstrap = args.bootstrap or broker.bootstrap_servers  # type: ignore[union-attr]
    tmp = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    cfg_path = tmp / "c.toml"
    cfg_path.write_text(
        f'topic_prefix = "b{uuid.uuid4().hex[:8]}"\n[kafka]\n"bootstrap.servers" = "{bootstrap}"\n'
        f'[[tables]]\nname = "user"\ndim = {DIM}\npartitions = 4\n'
        f'[[tables]]\nname = "item"\ndim = {DIM}\npartitions = 4\n'
        f"[serving]\ncache_capacity = {2 * ROWS}\nmax_lookup_keys = 65536\n[processor]\nlmdb_sync = false\n"
    )
    cfg = Config.load(cfg_path)
    rng = np.random.default_rng(0)
    keys = np.arange(ROWS, dtype=np.int64) * 7 + 11
    with Publisher.from_config(cfg) as pub:
        pub.create_topics()
        for t in ("user", "item"):
            pub.publish(t, keys, rng.standard_normal((ROWS, DIM)).astype(np.float32), version=1)
        pub.commit(1)
        state = {
            "bottom.0.weight": rng.standard_normal((DIM, 2)).astype(np.float32),
            "bottom.0.bias": np.zeros(DIM, np.float32),
            "top.0.weight": rng.standard_normal((32, DIM + 3)).astype(np.float32),
            "top.0.bias": np.zeros(32, np.float32),
            "top.2.weight": rng.standard_normal((1, 32)).astype(np.float32),
            "top.2.bias": np.zeros(1, np.float32),
        }
        pub.publish_dense(state, 1)
    proc = start_processor(cfg_path, tmp / "store", log_path=tmp / "processor.log")
    results: list[dict[str, Any]] = []
    try:
        for t in ("user", "item"):
            wait_for_applied_version(tmp / "store", t, 1, timeout=120, proc=proc)
        worker = InferenceWorker.from_config(cfg, store=tmp / "store").start()
        worker.wait_ready(60)
        server = InferenceServer(worker, cfg, port=0).start()
        client = InferenceClient(server.url)
        deadline = time.monotonic() + 30
        while server.model is None and time.monotonic() < deadline:
            time.sleep(0.05)
        for batch in (1, 1024, 8192):
            sample = keys[rng.integers(0, ROWS, batch)]
            for lo in range(0, ROWS, 50_000):  # every row resident: measure the cache path
                worker.lookup("user", keys[lo : lo + 50_000])
            n, lat = timed(functools.partial(worker.lookup, "user", sample), args.seconds)
            ceiling = batch * n / lat.sum()
            results.append(row("in-process", batch, n, lat, ceiling))
            n, lat = timed(
                functools.partial(client.lookup, "user", sample, binary=True), args.seconds
            )
            results.append(row("http binary", batch, n, lat, ceiling))
            n, lat = timed(
                functools.partial(client.lookup, "user", sample, binary=False), args.seconds
            )
            results.append(row("http json", batch, n, lat, ceiling))
        n, lat = timed(client.healthy, args.seconds)
        results.append(row("http floor (/healthz)", 1, n, lat, None))
        b = 512
        users, items = keys[rng.integers(0, ROWS, b)], keys[rng.integers(0, ROWS, b)]
        dense = rng.standard_normal((b, 2)).astype(np.float32)
        model = DenseModel(state, ["user", "item"], 1)
        n, lat = timed(
            lambda: model.predict(
                [worker.lookup("user", users), worker.lookup("item", items)], dense
            ),
            args.seconds,
        )
        ceiling = b * n / lat.sum()
        results.append(row("predict in-process", b, n, lat, ceiling))
        n, lat = timed(lambda: client.predict({"user": users, "item": items}, dense), args.seconds)
        results.append(row("predict http", b, n, lat, ceiling))
        server.stop()
        worker.stop()
    finally:
        stop_processor(proc)
        if broker is not None:
            broker.stop()

    print(f"{'case':24} {'batch':>6} {'keys/s':>12} {'p50 ms':>8} {'p99 ms':>8} {'% in-proc':>9}")
    for r in results:
        pct = "-" if r["pct_of_in_process"] is None else f"{r['pct_of_in_process']:.1f}"
        print(
            f"{r['case']:24} {r['batch']:>6} {r['keys_per_s']:>12,.0f} {r['p50_ms']:>8.3f} {r['p99_ms']:>8.3f} {pct:>9}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"machine": platform.platform(), "rows": ROWS, "dim": DIM, "results": results}, indent=2
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
