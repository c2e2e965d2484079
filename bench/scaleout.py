"""Scale-out: predict through a main + 2 and 4 sparse shards beside one server holding everything.

Setup (embedded broker, loopback): ``--tables`` tables of ``--rows`` rows, dim ``--dim`` fp32,
``--partitions`` partitions each, published at version 1 with a DLRM dense head (13 dense
features); two processor shards (``--shard 0/2``, ``1/2``) write two LMDB stores. Servers run as
separate ``streamhps serve`` processes, as deployed:

* ``single``: ``serve --store stores`` (every partition; cache sized to hold every row);
* ``main+N``: ``serve --role sparse --placement P_N --shard i`` for i < N (GPU ``i % --gpus``
  with ``--device cuda``) and ``serve --role main --placement P_N --shards ...`` (its dense model
  on the single server's device).

``P_N`` is a load-balanced placement over a Zipf(1.05) key trace, planned within a per-shard
cache capacity ``G`` = 60 % of what one worker needs for every row: ``streamhps plan`` refuses
N = 1 (printed), while N = 2 and 4 fit, and every row is then read back through the main and
compared with what was published ("rows served beyond one worker's cache capacity, exactly").

Latency: one client, closed loop, keep-alive, the same request bodies for every configuration
(keys drawn Zipf(1.05) from another seed than the trace, bodies built once): ``predict``
(``POST /v1/predict``, binary body, as the client sends it) and ``lookup_many`` (binary, every
table) p50/p99 per batch size; the
fan-out overhead is main+N minus single, in ms and %. Floor beside them: a ``GET /healthz``
round trip (one HTTP hop on this stack).

Imbalance: each strategy (table, row, load) on a Zipf(1.05) trace of a wider model (8 tables of
different sizes and lookups per example), 2/4/8 shards, max/mean lookups per shard.

    python bench/scaleout.py                                  # cpu, writes bench/results/scaleout.json
    python bench/scaleout.py --device cuda --gpus 2 --out $OUT/scaleout.json
    python bench/scaleout.py --quick                          # small, for a smoke run
"""

from __future__ import annotations

import argparse
import http.client
import math
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from report import write_json

from streamhps import Config, Publisher
from streamhps.broker import EmbeddedBroker
from streamhps.cache import memory_estimate
from streamhps.client import InferenceClient
from streamhps.errors import PlacementError
from streamhps.placement import GIB, plan, zipf_trace
from streamhps.processes import stop_process
from streamhps.testing import start_processor, stop_processor, wait_for_applied_version

ROOT = Path(__file__).resolve().parents[1]
NUM_DENSE = 13


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def config_text(prefix: str, bootstrap: str, args: argparse.Namespace) -> str:
    lines = [f'topic_prefix = "{prefix}"', "[kafka]", f'"bootstrap.servers" = "{bootstrap}"']
    for t in range(args.tables):
        lines += ["[[tables]]", f'name = "t{t}"', f"dim = {args.dim}",
                  f"partitions = {args.partitions}", 'missing = "error"']  # fmt: skip
    lines += [
        "[serving]", "max_staleness_s = 30.0",
        f"cache_capacity = {math.ceil(args.rows * 1.25)}", "max_lookup_keys = 1048576",
        "[processor]", "batch_max_seconds = 0.05", "lmdb_sync = false", "lmdb_metasync = false",
        "map_size_bytes = 4294967296",
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def dense_state(tables: int, dim: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    f = 1 + tables
    top_in = dim + f * (f - 1) // 2

    def w(o: int, i: int) -> np.ndarray:
        return (rng.standard_normal((o, i)) / np.sqrt(i)).astype(np.float32)

    return {
        "bottom.0.weight": w(dim, NUM_DENSE),
        "bottom.0.bias": np.zeros(dim, np.float32),
        "top.0.weight": w(128, top_in),
        "top.0.bias": np.zeros(128, np.float32),
        "top.2.weight": w(1, 128),
        "top.2.bias": np.zeros(1, np.float32),
    }


class Proc:
    """A ``streamhps serve`` process."""

    def __init__(self, name: str, args: list[str], log_dir: Path, env: dict[str, str]) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log_dir / f"{name}.log"
        cmd = [sys.executable, "-m", "streamhps", "serve", *args, "--port", str(self.port)]
        with open(self.log, "ab") as out:
            self.p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float) -> None:
        try:
            self._wait_ready(timeout)
        except RuntimeError:
            print(
                f"--- last lines of {self.log}:\n"
                + "\n".join(self.log.read_text().splitlines()[-30:])
            )
            raise

    def _wait_ready(self, timeout: float) -> None:
        c = InferenceClient(self.url)
        deadline = time.monotonic() + timeout
        while True:
            if self.p.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.p.returncode}); see {self.log}")
            try:
                ok, reason = c.ready()
                if ok:
                    return
            except Exception as e:  # noqa: BLE001 - not listening yet
                reason = str(e)
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready after {timeout}s: {reason}; {self.log}")
            time.sleep(0.2)

    def stop(self) -> None:
        stop_process(self.p, 20, name=self.name)


def wait_dense(url: str, timeout: float) -> None:
    c = InferenceClient(url)
    deadline = time.monotonic() + timeout
    while (c.status().get("dense_model") or {}).get("version") is None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url}: no dense model after {timeout}s")
        time.sleep(0.1)


class Raw:
    """One keep-alive connection that sends prebuilt bodies (client cost out of the figures)."""

    def __init__(self, url: str) -> None:
        host, port = url.rsplit("//", 1)[1].split(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=120)
        self.conn.connect()
        self.conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def call(self, method: str, path: str, body: bytes | None, ctype: str | None) -> bytes:
        self.conn.request(method, path, body=body, headers={"Content-Type": ctype} if ctype else {})
        resp = self.conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"{method} {path}: HTTP {resp.status}: {data[:300]!r}")
        return data

    def close(self) -> None:
        self.conn.close()


def measure(
    url: str, reqs: Sequence[tuple[str, str, bytes | None, str | None]], warm: int
) -> np.ndarray:
    raw = Raw(url)
    try:
        for r in reqs[:warm]:
            raw.call(*r)
        lat = []
        for r in reqs:
            t0 = time.perf_counter()
            raw.call(*r)
            lat.append(time.perf_counter() - t0)
        return np.asarray(lat)
    finally:
        raw.close()


def pct(lat: np.ndarray) -> dict[str, float]:
    return {"p50_ms": float(np.percentile(lat, 50) * 1e3),
            "p99_ms": float(np.percentile(lat, 99) * 1e3), "n": int(lat.size)}  # fmt: skip


def imbalance_table(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Each strategy on a Zipf(1.05) trace of a wider model (tables differ in size and in
    lookups per example, as DLRM features do)."""
    sizes = [2_000_000, 1_000_000, 500_000, 200_000, 100_000, 50_000, 20_000, 5_000]
    pooling = [1, 20, 3, 8, 1, 40, 2, 10]  # lookups per example
    cfg = Config.from_dict(
        {"tables": [{"name": f"f{i}", "dim": 64, "partitions": 32} for i in range(len(sizes))]}
    )
    examples = 20_000 if args.quick else 50_000
    rows = {f"f{i}": n for i, n in enumerate(sizes)}
    trace = zipf_trace(cfg, {f"f{i}": examples * p for i, p in enumerate(pooling)}, rows=rows,
                       alpha=1.05, seed=11)  # fmt: skip
    out = []
    for n in (2, 4, 8):
        for strategy in ("table", "row", "load"):
            p = plan(cfg, n, strategy=strategy, trace=trace, rows=rows)
            out.append({"shards": n, "strategy": strategy, "imbalance": p.imbalance,
                        "memory_imbalance": p.memory_imbalance,
                        "max_memory_gib": max(s.memory_bytes for s in p.shards) / GIB})  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--gpus", type=int, default=1, help="sparse shard i runs on cuda:(i %% gpus)")
    ap.add_argument("--tables", type=int, default=4)
    ap.add_argument("--rows", type=int, default=200_000, help="rows per table")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--partitions", type=int, default=16)
    ap.add_argument("--shards", default="2,4")
    ap.add_argument("--batches", default="256,1024,4096,16384")
    ap.add_argument("--requests", type=int, default=200, help="requests per batch size (fewer "
                    "for big batches: at most 8M keys per batch size)")  # fmt: skip
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "scaleout.json"))
    args = ap.parse_args()
    if args.quick:
        args.rows, args.requests, args.partitions = 20_000, 40, 8
        args.batches = "256,1024"
    shard_counts = [int(x) for x in args.shards.split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="scaleout-"))
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count(), "device": args.device, "gpus": args.gpus},
        "setup": {"tables": args.tables, "rows_per_table": args.rows, "dim": args.dim,
                  "partitions": args.partitions, "num_dense": NUM_DENSE},
    }  # fmt: skip
    print("imbalance (max/mean lookups per shard) on a Zipf(1.05) trace, 8 tables x 32 partitions")
    result["imbalance"] = imbalance_table(args)
    for r in result["imbalance"]:
        print(f"  {r['shards']} shards  {r['strategy']:5}  {r['imbalance']:.3f}"
              f"   (memory max/mean {r['memory_imbalance']:.2f})")  # fmt: skip

    procs: list[Proc] = []
    broker = EmbeddedBroker(port=0, log_path=tmp / "broker.log").start()
    processors: list[Any] = []
    try:
        cfg_path = tmp / "streamhps.toml"
        cfg_path.write_text(
            config_text(f"so{uuid.uuid4().hex[:8]}", broker.bootstrap_servers, args)
        )
        cfg = Config.load(cfg_path)
        names = [t.name for t in cfg.tables]
        rng = np.random.default_rng(0)
        t0 = time.perf_counter()
        published: dict[str, np.ndarray] = {}
        with Publisher.from_config(cfg) as pub:
            pub.create_topics()
            for name in names:
                vec = rng.standard_normal((args.rows, args.dim)).astype(np.float32)
                published[name] = vec
                pub.publish(name, np.arange(args.rows, dtype=np.int64), vec, version=1)
            pub.commit(1)
            pub.publish_dense(dense_state(args.tables, args.dim), version=1)
            pub.flush()
        stores = tmp / "stores"
        for i in range(2):
            processors.append(start_processor(cfg_path, stores / str(i), shard=f"{i}/2",
                                              log_path=tmp / f"processor{i}.log", env=env))  # fmt: skip
        for i, proc in enumerate(processors):
            for name in names:
                wait_for_applied_version(stores / str(i), name, 1, timeout=600, proc=proc)
        for proc in processors:  # the stores are complete; the servers tail Kafka themselves
            stop_processor(proc)
        processors.clear()
        total_rows = args.rows * len(names)
        print(f"published and stored {total_rows:,} rows in {time.perf_counter() - t0:.1f}s")

        # capacity: 60 % of what one worker needs for every row
        need = sum(memory_estimate(math.ceil(args.rows * 1.25), args.dim, "float32",
                                   "cuda" if args.device == "cuda" else "numpy") for _ in names)  # fmt: skip
        cap = int(0.6 * need)
        backend = "cuda" if args.device == "cuda" else "numpy"
        trace = zipf_trace(cfg, dict.fromkeys(names, 100_000), rows=dict.fromkeys(names, args.rows),
                           alpha=1.05, seed=1)  # fmt: skip
        rows_given = dict.fromkeys(names, args.rows)
        refusal = None
        try:
            plan(cfg, 1, strategy="load", trace=trace, rows=rows_given, capacity_bytes=cap,
                 backend=backend)  # fmt: skip
        except PlacementError as e:
            refusal = str(e)
        print(f"capacity per shard {cap / GIB:.3f} GiB (60 % of one worker's {need / GIB:.3f} GiB)"
              f"; one shard: refused: {refusal}")  # fmt: skip
        placements = {}
        for n in shard_counts:
            p = plan(cfg, n, strategy="load", trace=trace, rows=rows_given, capacity_bytes=cap,
                     backend=backend)  # fmt: skip
            placements[n] = p.save(tmp / f"placement{n}.json")
            print(f"  {n} shards: load-balanced, imbalance {p.imbalance:.3f}, memory per shard "
                  f"{[round(s.memory_bytes / GIB, 3) for s in p.shards]} GiB")  # fmt: skip
        # one worker's capacity in rows: the largest share f of every table that fits in cap
        lo, hi = 0.0, 1.0
        for _ in range(40):
            f = (lo + hi) / 2
            m = sum(memory_estimate(max(1, math.ceil(args.rows * f * 1.25)), args.dim, "float32",
                                    backend) for _ in names)  # fmt: skip
            lo, hi = (f, hi) if m <= cap else (lo, f)
        one_worker_rows = int(lo * total_rows)
        result["capacity"] = {"capacity_bytes_per_shard": cap, "one_worker_bytes_for_all": need,
                              "one_shard_refused": refusal, "total_rows": total_rows,
                              "one_worker_rows_within_capacity": one_worker_rows}  # fmt: skip

        # requests: the same for every configuration
        qrng = np.random.default_rng(2)
        reqs_trace = {}
        for b in batches:
            n_req = max(10, min(args.requests, (8 << 20) // (b * len(names))))
            ks = zipf_trace(cfg, dict.fromkeys(names, b * n_req), rows=rows_given, alpha=1.05,
                            seed=100 + b)  # fmt: skip
            predict, many = [], []
            for r in range(n_req):
                feats = {t: ks[t][r * b : (r + 1) * b] for t in names}
                x = qrng.standard_normal((b, NUM_DENSE)).astype("<f4")
                query = f"tables={','.join(names)}&counts={','.join(str(b) for _ in names)}"
                kb = b"".join(feats[t].astype("<i8").tobytes() for t in names)
                # the binary predict body (the client's default): keys, then dense features
                predict.append(
                    ("POST", f"/v1/predict?{query}", kb + x.tobytes(), "application/octet-stream")
                )
                many.append(("POST", f"/v1/lookup_many?{query}", kb, "application/octet-stream"))
            reqs_trace[b] = (predict, many)
        floor_reqs = [("GET", "/healthz", None, None)] * 300

        def device_of(i: int) -> str:
            return "cpu" if args.device == "cpu" else f"cuda:{i % args.gpus}"

        def run_config(label: str, url: str) -> dict[str, Any]:
            out: dict[str, Any] = {"floor_healthz": pct(measure(url, floor_reqs, 20))}
            for b in batches:
                predict, many = reqs_trace[b]
                warm = max(2, len(predict) // 10)
                out[str(b)] = {"predict": pct(measure(url, predict, warm)),
                               "lookup_many": pct(measure(url, many, warm))}  # fmt: skip
                print(f"  {label:8} batch {b:6}: predict p50 {out[str(b)]['predict']['p50_ms']:8.2f}"
                      f" p99 {out[str(b)]['predict']['p99_ms']:8.2f} ms | lookup_many p50 "
                      f"{out[str(b)]['lookup_many']['p50_ms']:7.2f} p99 "
                      f"{out[str(b)]['lookup_many']['p99_ms']:7.2f} ms")  # fmt: skip
            return out

        print("latency (one client, closed loop, loopback):")
        single = Proc("single", ["--config", str(cfg_path), "--store", str(stores),
                                 "--device", device_of(0)], tmp, env)  # fmt: skip
        procs.append(single)
        single.wait_ready(600)
        wait_dense(single.url, 60)
        result["single"] = run_config("single", single.url)
        single.stop()
        procs.remove(single)

        for n in shard_counts:
            sparse = [Proc(f"sparse{n}-{i}", ["--config", str(cfg_path), "--role", "sparse",
                           "--placement", str(placements[n]), "--shard", str(i), "--store",
                           str(stores), "--device", device_of(i)], tmp, env)
                      for i in range(n)]  # fmt: skip
            procs.extend(sparse)
            for sp in sparse:
                sp.wait_ready(600)
            # the main's dense model on the device the single server's runs on
            main_p = Proc(f"main{n}", ["--config", str(cfg_path), "--role", "main", "--placement",
                          str(placements[n]), "--shards", ",".join(s.url for s in sparse),
                          "--device", device_of(0)], tmp, env)  # fmt: skip
            procs.append(main_p)
            main_p.wait_ready(120)
            wait_dense(main_p.url, 60)
            label = f"main+{n}"
            res = run_config(label, main_p.url)
            # every row through the main, compared with what was published
            c = InferenceClient(main_p.url)
            exact = 0
            step = 65536
            for name in names:
                for lo_k in range(0, args.rows, step):
                    keys = np.arange(lo_k, min(args.rows, lo_k + step), dtype=np.int64)
                    got = c.lookup_many({name: keys})[name]
                    exact += int((got == published[name][keys]).all(axis=1).sum())
            shards_stats = c.status()["worker"]["shards"]
            res["rows_served_exactly"] = exact
            res["rows_beyond_one_worker_capacity"] = exact - one_worker_rows
            res["shard_lookups"] = [s.get("lookups") for s in shards_stats]
            print(f"  {label}: {exact:,} of {total_rows:,} rows read back exactly through the main;"
                  f" {exact - one_worker_rows:,} beyond one worker's capacity "
                  f"({one_worker_rows:,} rows)")  # fmt: skip
            result[label] = res
            main_p.stop()
            for sp in sparse:
                sp.stop()
            procs[:] = [p for p in procs if p not in (main_p, *sparse)]
    finally:
        for proc_ in procs:
            proc_.stop()
        for proc in processors:
            stop_processor(proc)
        broker.stop()

    # the table
    print()
    print(f"{'batch':>6} {'config':>8} {'predict p50':>12} {'p99':>9} {'overhead p50':>14} "
          f"{'p99':>16} | {'lookup_many p50':>15} {'p99':>9} {'overhead p99':>16}")  # fmt: skip
    rows_out = []
    for b in batches:
        s = result["single"][str(b)]
        for label in ["single", *(f"main+{n}" for n in shard_counts)]:
            r = result[label][str(b)]
            d50 = r["predict"]["p50_ms"] - s["predict"]["p50_ms"]
            d99 = r["predict"]["p99_ms"] - s["predict"]["p99_ms"]
            l99 = r["lookup_many"]["p99_ms"] - s["lookup_many"]["p99_ms"]
            row = {"batch": b, "config": label, **{f"predict_{k}": v for k, v in r["predict"].items()},
                   **{f"lookup_many_{k}": v for k, v in r["lookup_many"].items()},
                   "predict_overhead_p50_ms": d50, "predict_overhead_p99_ms": d99,
                   "predict_overhead_p50_pct": 100 * d50 / s["predict"]["p50_ms"],
                   "predict_overhead_p99_pct": 100 * d99 / s["predict"]["p99_ms"],
                   "lookup_many_overhead_p99_ms": l99,
                   "lookup_many_overhead_p99_pct": 100 * l99 / s["lookup_many"]["p99_ms"]}  # fmt: skip
            rows_out.append(row)
            ov = "" if label == "single" else (
                f"{d50:+7.2f} ({row['predict_overhead_p50_pct']:+5.1f}%) "
                f"{d99:+7.2f} ({row['predict_overhead_p99_pct']:+5.1f}%)")  # fmt: skip
            lov = (
                ""
                if label == "single"
                else f"{l99:+7.2f} ({row['lookup_many_overhead_p99_pct']:+5.1f}%)"
            )
            print(f"{b:>6} {label:>8} {r['predict']['p50_ms']:>12.2f} {r['predict']['p99_ms']:>9.2f} "
                  f"{ov:>31} | {r['lookup_many']['p50_ms']:>15.2f} {r['lookup_many']['p99_ms']:>9.2f} "
                  f"{lov:>16}")  # fmt: skip
    floor = result["single"]["floor_healthz"]
    print(
        f"floor: GET /healthz round trip p50 {floor['p50_ms']:.3f} ms, p99 {floor['p99_ms']:.3f} ms"
    )
    result["table"] = rows_out
    write_json(args.out, result)


if __name__ == "__main__":
    main()
