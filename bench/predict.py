"""Whole predict requests on the cpu and the cuda worker, beside the bare-torch ceiling.

The model of issue 8: ``--tables`` tables (8) of ``--rows`` rows (500k), dim 64 fp32, Zipf(1.05)
keys, the DLRM head bottom 13-512-256-64, top 512-256-1 (``streamhps.models.DLRMDense``). Every
row is resident (the caches are warmed from the LMDB store), so the figures are the hit path.

In process, one request = every table's lookup + the dense model, host numpy in, host scores out:

* ``cpu worker``:   ``InferenceWorker(device="cpu").lookup_many`` + the module on CPU torch;
* ``cpu bare``:     ``index_select`` from CPU tensors holding the same rows + the same module;
* ``cuda worker``:  ``InferenceWorker(device="cuda").lookup_many`` + the module on the GPU;
* ``cuda bare``:    the ceiling: keys through one pinned buffer to the GPU, ``index_select``
  from the same rows resident as torch tensors, the same module, scores back;
* ``... lookup``:   the lookups alone (both sides), to split the gap into lookup and model.

Over HTTP (``InferenceClient.predict``, binary body, one client): p50/p99 per batch for both
workers. Throughput: ``--clients`` (64) concurrent clients of batch ``--client-batch`` (64), in
client processes of their own, against the cuda (and cpu) server with and without dynamic
batching. Pooled (multi-hot) lookups: the fused kernel beside the HBM copy bandwidth and
``torch.nn.functional.embedding_bag`` on the same rows, measured in the same run.

    python bench/predict.py                          # GPU machine: everything, JSON to --out
    python bench/predict.py --devices cpu --rows 20000 --tables 2 --batches 256,1024 --quick
"""

# ruff: noqa: B023 - timing closures run at once, inside their loop iteration
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from report import write_json

from servers.app import InferenceServer  # noqa: E402
from servers.model import ServedModel  # noqa: E402
from streamhps import Config  # noqa: E402
from streamhps.broker import EmbeddedBroker  # noqa: E402
from streamhps.client import InferenceClient  # noqa: E402
from streamhps.models import DLRMDense  # noqa: E402
from streamhps.store import LmdbStore  # noqa: E402
from streamhps.store.base import WriteBatch  # noqa: E402
from streamhps.worker import InferenceWorker  # noqa: E402

NUM_DENSE, BOTTOM, TOP = 13, (512, 256, 64), (512, 256)
RESULTS: dict[str, Any] = {"in_process": [], "http": [], "throughput": [], "pooled": []}


def zipf_keys(rng: np.random.Generator, rows: int, n: int, a: float = 1.05) -> np.ndarray:
    """Zipf(a) over ``rows`` ranks, the ranks shuffled over the keys (hot keys spread out)."""
    cdf = np.cumsum(1.0 / np.arange(1, rows + 1) ** a)
    ranks = np.searchsorted(cdf, rng.random(n) * cdf[-1])
    perm = np.random.default_rng(12345).permutation(rows)
    return perm[np.minimum(ranks, rows - 1)].astype(np.int64)


def timed(
    fn: Callable[[], Any], seconds: float, min_reps: int = 5, max_reps: int = 3000
) -> np.ndarray:
    for _ in range(2):
        fn()
    lat: list[float] = []
    end = time.perf_counter() + seconds
    while len(lat) < min_reps or (time.perf_counter() < end and len(lat) < max_reps):
        t0 = time.perf_counter()
        fn()
        lat.append(time.perf_counter() - t0)
    return np.asarray(lat)


def summary(case: str, batch: int, lat: np.ndarray, **extra: Any) -> dict[str, Any]:
    return {
        "case": case, "batch": batch, "requests": int(lat.size),
        "p50_ms": float(np.percentile(lat, 50) * 1e3), "p99_ms": float(np.percentile(lat, 99) * 1e3),
        "rows_per_s": float(batch * lat.size / lat.sum()), **extra,
    }  # fmt: skip


# ---------------------------------------------------------------------------- setup


def build(
    args: argparse.Namespace, tmp: Path, bootstrap: str
) -> tuple[Config, list[str], list[np.ndarray]]:
    tables = [f"t{i}" for i in range(args.tables)]
    lines = [
        f'topic_prefix = "p{uuid.uuid4().hex[:8]}"',
        "[kafka]",
        f'"bootstrap.servers" = "{bootstrap}"',
    ]
    for t in tables:
        lines += [
            "[[tables]]",
            f'name = "{t}"',
            f"dim = {args.dim}",
            "partitions = 4",
            'missing = "zeros"',
        ]
    cap = 1 << max(12, (2 * args.rows - 1).bit_length())  # half full: no bucket overflows
    lines += ["[serving]", f"cache_capacity = {cap}", "max_lookup_keys = 65536",
              "warm_from_store = true", "max_staleness_s = 60.0"]  # fmt: skip
    (tmp / "c.toml").write_text("\n".join(lines) + "\n")
    cfg = Config.load(tmp / "c.toml")
    rng = np.random.default_rng(0)
    weights = []
    t0 = time.perf_counter()
    with LmdbStore.open(tmp / "store", readonly=False, sync=False, metasync=False) as st:
        st.ensure_tables({t.name: t for t in cfg.tables})
        keys = np.arange(args.rows, dtype=np.int64)
        for t in tables:
            w = (0.1 * rng.standard_normal((args.rows, args.dim))).astype(np.float32)
            weights.append(w)
            for lo in range(0, args.rows, 1 << 17):
                b = WriteBatch()
                hi = min(args.rows, lo + (1 << 17))
                b.table_rows(t).add(keys[lo:hi], w[lo:hi], np.ones(hi - lo, np.int64))
                st.write_batch(b)
    print(
        f"store: {args.tables} x {args.rows} rows written in {time.perf_counter() - t0:.1f}s",
        flush=True,
    )
    return cfg, tables, weights


def dense_state() -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    return DLRMDense(NUM_DENSE, BOTTOM, TOP, 8).dense_state()


def requests(
    args: argparse.Namespace, tables: list[str], batch: int, n: int = 4
) -> list[tuple[dict[str, np.ndarray], np.ndarray]]:
    rng = np.random.default_rng(batch)
    return [
        ({t: zipf_keys(rng, args.rows, batch) for t in tables},
         rng.standard_normal((batch, NUM_DENSE)).astype(np.float32))
        for _ in range(n)
    ]  # fmt: skip


def start_worker(cfg: Config, store: Path, device: str) -> InferenceWorker:
    t0 = time.perf_counter()
    w = InferenceWorker(cfg, store, device=device).start()
    w.wait_ready(120)
    print(f"{device} worker ready (caches warmed) in {time.perf_counter() - t0:.1f}s", flush=True)
    return w


# ---------------------------------------------------------------------------- in process


def in_process(
    args: argparse.Namespace,
    cfg: Config,
    tables: list[str],
    weights: list[np.ndarray],
    workers: dict[str, InferenceWorker],
) -> None:
    state = (
        dense_state()
        if args.tables == 8
        else DLRMDense(NUM_DENSE, BOTTOM, TOP, args.tables).dense_state()
    )
    for device, w in workers.items():
        model = ServedModel(state, tables, 1, w.torch_device)
        tdev = torch.device(w.torch_device)
        resident = [torch.from_numpy(x).to(tdev) for x in weights]
        bare = model.module  # the same module, the same weights
        total_keys = len(tables) * max(args.batch_list)
        pinned = torch.empty(total_keys, dtype=torch.int64)
        if tdev.type == "cuda":
            pinned = pinned.pin_memory()
        for batch in args.batch_list:
            reqs = requests(args, tables, batch)
            i = [0]

            def nxt() -> tuple[dict[str, np.ndarray], np.ndarray]:
                i[0] += 1
                return reqs[i[0] % len(reqs)]

            def ours() -> np.ndarray:
                keys, x = nxt()
                return model.predict(w.lookup_many(keys), x)

            def ours_lookup() -> Any:
                keys, _ = nxt()
                return w.lookup_many(keys)

            def bare_lookup(with_model: bool) -> Any:
                keys, x = nxt()
                n = len(tables) * batch
                staged = pinned[:n].view(len(tables), batch)
                staged.numpy()[:] = np.stack([keys[t] for t in tables])
                kd = staged.to(tdev, non_blocking=True)
                embs = [torch.index_select(resident[j], 0, kd[j]) for j in range(len(tables))]
                if not with_model:
                    if tdev.type == "cuda":
                        torch.cuda.synchronize(tdev)
                    return embs
                with torch.inference_mode():
                    p = torch.sigmoid(bare(embs, model._dense(x)))
                return p.cpu().numpy()

            # correctness: ours equals the ceiling on the same request
            keys, x = reqs[0]
            i[0] = -1
            want = bare_lookup(True)
            got = model.predict(w.lookup_many(keys), x)
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
            sec = args.seconds
            rows = [
                summary(f"{device} worker", batch, timed(ours, sec)),
                summary(f"{device} bare", batch, timed(lambda: bare_lookup(True), sec)),
                summary(f"{device} worker lookup", batch, timed(ours_lookup, sec / 2)),
                summary(f"{device} bare lookup", batch, timed(lambda: bare_lookup(False), sec / 2)),
            ]
            for r in rows:
                r["device"] = device
            RESULTS["in_process"].extend(rows)
            print(f"  {device} batch {batch:>6}: worker p50 {rows[0]['p50_ms']:.3f} ms, bare {rows[1]['p50_ms']:.3f} ms,"
                  f" lookups {rows[2]['p50_ms']:.3f} vs {rows[3]['p50_ms']:.3f} ms", flush=True)  # fmt: skip
        if tdev.type == "cuda" and args.profile:
            profile(w, model, requests(args, tables, 1024))


def profile(w: InferenceWorker, model: ServedModel, reqs: list[Any]) -> None:
    """Where a batch-1024 request's time goes (torch profiler: host ops and every GPU kernel)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    for keys, x in reqs:
        model.predict(w.lookup_many(keys), x)
    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        for _ in range(5):
            for keys, x in reqs:
                model.predict(w.lookup_many(keys), x)
    table = p.key_averages().table(sort_by="cpu_time_total", row_limit=22, max_name_column_width=48)
    RESULTS["profile_batch_1024"] = table
    print(table, flush=True)


# ---------------------------------------------------------------------------- HTTP


def http_latency(
    args: argparse.Namespace, tables: list[str], servers: dict[str, InferenceServer]
) -> None:
    for device, server in servers.items():
        c = InferenceClient(server.url, timeout=120)
        for batch in args.http_list:
            reqs = requests(args, tables, batch, n=2)
            i = [0]

            def call() -> np.ndarray:
                i[0] += 1
                keys, x = reqs[i[0] % 2]
                return c.predict(keys, x)

            r = summary(f"{device} http", batch, timed(call, args.seconds), device=device)
            RESULTS["http"].append(r)
            print(
                f"  http {device} batch {batch:>6}: p50 {r['p50_ms']:.3f} ms p99 {r['p99_ms']:.3f} ms",
                flush=True,
            )
        c.close()


def _client_proc(
    url: str,
    threads: int,
    batch: int,
    tables: list[str],
    rows: int,
    seconds: float,
    ready: Any,
    go: Any,
    q: Any,
) -> None:
    counts = [0] * threads
    lats: list[list[float]] = [[] for _ in range(threads)]
    warm = threading.Barrier(threads + 1)

    def run(j: int) -> None:
        c = InferenceClient(url, timeout=60)
        rng = np.random.default_rng(os.getpid() * 100 + j)
        reqs = [({t: rng.integers(0, rows, batch) for t in tables},
                 rng.standard_normal((batch, NUM_DENSE)).astype(np.float32)) for _ in range(4)]  # fmt: skip
        c.predict(*reqs[0])
        warm.wait()
        go.wait()
        end = time.perf_counter() + seconds
        k = 0
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            c.predict(*reqs[k % 4])
            lats[j].append(time.perf_counter() - t0)
            k += 1
        counts[j] = k

    ts = [threading.Thread(target=run, args=(j,)) for j in range(threads)]
    for t in ts:
        t.start()
    warm.wait()
    ready.put(1)
    for t in ts:
        t.join()
    q.put((sum(counts), [x for lat in lats for x in lat]))


def throughput(
    args: argparse.Namespace, tables: list[str], servers: dict[str, InferenceServer]
) -> None:
    procs = min(8, args.clients)
    per = args.clients // procs
    ctx = mp.get_context("spawn")
    for name, server in servers.items():
        q, ready, go = ctx.Queue(), ctx.Queue(), ctx.Event()
        ps = [ctx.Process(target=_client_proc, args=(server.url, per, args.client_batch, tables, args.rows,
                                                      args.throughput_seconds, ready, go, q)) for _ in range(procs)]  # fmt: skip
        for p in ps:
            p.start()
        for _ in ps:  # every client connected and warm: then all start together
            ready.get(timeout=300)
        b0 = server.batcher.stats.batches if server.batcher else 0
        r0 = server.batcher.stats.requests if server.batcher else 0
        go.set()
        got = [q.get(timeout=args.throughput_seconds + 120) for _ in ps]
        for p in ps:
            p.join(30)
        n = sum(g[0] for g in got)
        lat = np.asarray([x for g in got for x in g[1]])
        r = {
            "case": name, "clients": procs * per, "client_batch": args.client_batch,
            "requests_per_s": n / args.throughput_seconds,
            "rows_per_s": n * args.client_batch / args.throughput_seconds,
            "p50_ms": float(np.percentile(lat, 50) * 1e3) if lat.size else None,
            "p99_ms": float(np.percentile(lat, 99) * 1e3) if lat.size else None,
        }  # fmt: skip
        if server.batcher is not None:
            b, rq = server.batcher.stats.batches - b0, server.batcher.stats.requests - r0
            r["mean_requests_per_batch"] = rq / max(1, b)
        RESULTS["throughput"].append(r)
        print(f"  throughput {name}: {r['requests_per_s']:.0f} req/s, p50 {r['p50_ms']:.2f} ms, "
              f"p99 {r['p99_ms']:.2f} ms {r.get('mean_requests_per_batch', '')}", flush=True)  # fmt: skip


# ---------------------------------------------------------------------------- pooled


def pooled(args: argparse.Namespace) -> None:
    import cupy as cp

    from streamhps.cache import make_cache
    from streamhps.cache.cuda_backend import CudaCache

    def t_gpu(fn: Callable[[], Any], reps: int = 20) -> float:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        ts = []
        for _ in range(5):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            for _ in range(reps):
                fn()
            e.record()
            e.synchronize()
            ts.append(s.elapsed_time(e) / 1e3 / reps)
        return float(np.median(ts))

    n = 1 << 28  # 1 GiB of fp32
    a = torch.randn(n, device="cuda")
    b = torch.empty_like(a)
    copy_bps = 2 * n * 4 / t_gpu(lambda: b.copy_(a), reps=10)
    RESULTS["hbm_copy_GBps"] = copy_bps / 1e9
    print(f"HBM copy (read+write): {copy_bps / 1e9:.0f} GB/s", flush=True)
    rng = np.random.default_rng(5)
    rows = args.pooled_rows
    for dim in (64, 128):
        cache = cast(CudaCache, make_cache("cuda", capacity=2 * rows, dim=dim))
        w = (0.1 * rng.standard_normal((rows, dim))).astype(np.float32)
        for lo in range(0, rows, 1 << 18):
            hi = min(rows, lo + (1 << 18))
            cache.upsert(np.arange(lo, hi), w[lo:hi], np.ones(hi - lo, np.int64))
        wt = torch.from_numpy(w).cuda()
        n_bags = 16384
        lengths = rng.integers(1, 64, n_bags)  # mean 32 keys a bag
        offsets = np.concatenate(([0], np.cumsum(lengths)))
        nnz = int(offsets[-1])
        for dist in ("uniform", "zipf"):
            keys = rng.integers(0, rows, nnz) if dist == "uniform" else zipf_keys(rng, rows, nnz)
            with cache.device, cache.stream:
                kd, od = cp.asarray(keys), cp.asarray(offsets)
                out = cp.empty((n_bags, dim), dtype=cp.float32)
                hit = cp.empty(nnz, dtype=cp.bool_)
                misses = cp.zeros(1, dtype=cp.uint32)
            cache.stream.synchronize()
            t = t_gpu(lambda: cache.pooled_into(kd, od, "sum", out, hit, misses))
            kt, ot = torch.from_numpy(keys).cuda(), torch.from_numpy(offsets[:-1]).cuda()
            te = t_gpu(lambda: torch.nn.functional.embedding_bag(kt, wt, ot, mode="sum"))
            ref = torch.nn.functional.embedding_bag(kt, wt, ot, mode="sum")
            # A set-associative cache at half load drops a few rows of overflowing buckets
            # (counted in `misses`; the worker resolves them from its window and LMDB): compare
            # the bags whose every key hit.
            with cache.device, cache.stream:
                misses.fill(0)  # the timed calls added theirs: count one call's
                cache.pooled_into(kd, od, "sum", out, hit, misses)
            cache.stream.synchronize()
            n_missed = int(misses.get()[0])
            missed_before = torch.from_dlpack(
                cp.concatenate([cp.zeros(1, cp.int64), cp.cumsum((~hit).astype(cp.int64))])
            )
            ot_all = torch.from_numpy(offsets).cuda()
            full = (missed_before[ot_all[1:]] - missed_before[ot_all[:-1]]) == 0
            assert int((~full).sum()) <= n_missed, "a bag counted a miss no key of it had"
            torch.testing.assert_close(
                torch.from_dlpack(out)[full], ref[full], rtol=1e-4, atol=1e-4
            )
            moved = (nnz + n_bags) * dim * 4  # every row read once, every bag written once
            r = {
                "dim": dim, "keys": dist, "bags": n_bags, "keys_total": nnz,
                "fused_ms": t * 1e3, "fused_GBps": moved / t / 1e9,
                "pct_of_hbm_copy": 100 * moved / t / copy_bps,
                "embedding_bag_ms": te * 1e3, "embedding_bag_GBps": moved / te / 1e9,
                "keys_per_s": nnz / t, "misses": n_missed,
                "bags_compared": int(full.sum()),
            }  # fmt: skip
            RESULTS["pooled"].append(r)
            print(f"  pooled dim {dim} {dist}: {r['fused_GBps']:.0f} GB/s = {r['pct_of_hbm_copy']:.0f} % of copy; "
                  f"embedding_bag {r['embedding_bag_GBps']:.0f} GB/s", flush=True)  # fmt: skip


# ---------------------------------------------------------------------------- report


def report() -> None:
    ip = RESULTS["in_process"]
    by = {(r["case"], r["batch"]): r for r in ip}
    batches = sorted({r["batch"] for r in ip})
    print("\nin process, whole request (every table's lookup + the dense model), p50 / p99 ms")
    head = f"{'batch':>6} | {'cpu worker':>17} | {'cpu bare':>17} | {'cuda worker':>17} | {'cuda bare':>17} | {'gpu/cpu':>7} | {'gpu/bare':>8} | {'gpu-bare ms':>11}"
    print(head)
    for b in batches:
        cells = []
        for case in ("cpu worker", "cpu bare", "cuda worker", "cuda bare"):
            r = by.get((case, b))
            cells.append(f"{r['p50_ms']:7.3f} / {r['p99_ms']:7.3f}" if r else f"{'-':>17}")
        cw, cb, cpu = (
            by.get(("cuda worker", b)),
            by.get(("cuda bare", b)),
            by.get(("cpu worker", b)),
        )
        ratio = f"{cpu['p50_ms'] / cw['p50_ms']:7.1f}" if cw and cpu else f"{'-':>7}"
        vs = f"{cw['p50_ms'] / cb['p50_ms']:8.2f}" if cw and cb else f"{'-':>8}"
        gap = f"{cw['p50_ms'] - cb['p50_ms']:11.3f}" if cw and cb else f"{'-':>11}"
        print(f"{b:>6} | " + " | ".join(cells) + f" | {ratio} | {vs} | {gap}")
    print("\nlookups alone (p50 ms): worker lookup_many vs bare index_select")
    for b in batches:
        parts = []
        for d in ("cpu", "cuda"):
            r1, r2 = by.get((f"{d} worker lookup", b)), by.get((f"{d} bare lookup", b))
            if r1 and r2:
                parts.append(f"{d}: {r1['p50_ms']:.3f} vs {r2['p50_ms']:.3f}")
        print(f"{b:>6}  " + "   ".join(parts))
    if RESULTS["http"]:
        print("\nover HTTP (binary predict, one client), p50 / p99 ms")
        for r in RESULTS["http"]:
            print(
                f"  {r['case']:10} batch {r['batch']:>6}: {r['p50_ms']:8.3f} / {r['p99_ms']:8.3f}  ({r['requests']} requests)"
            )
    if RESULTS["throughput"]:
        print("\nthroughput, concurrent clients (own processes), binary predict")
        for r in RESULTS["throughput"]:
            extra = (
                f", {r['mean_requests_per_batch']:.1f} requests/batch"
                if "mean_requests_per_batch" in r
                else ""
            )
            print(f"  {r['case']:24} {r['clients']} x batch {r['client_batch']}: {r['requests_per_s']:8.0f} req/s"
                  f" ({r['rows_per_s']:,.0f} rows/s), p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms{extra}")  # fmt: skip
    if RESULTS["pooled"]:
        print(
            f"\npooled lookups (sum, 16384 bags of 1-63 keys), HBM copy {RESULTS['hbm_copy_GBps']:.0f} GB/s"
        )
        for r in RESULTS["pooled"]:
            print(f"  dim {r['dim']:>3} {r['keys']:8}: fused {r['fused_ms']:.3f} ms {r['fused_GBps']:6.0f} GB/s "
                  f"({r['pct_of_hbm_copy']:.0f} % of copy); embedding_bag {r['embedding_bag_ms']:.3f} ms "
                  f"{r['embedding_bag_GBps']:.0f} GB/s")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", default="cpu,cuda")
    ap.add_argument("--tables", type=int, default=8)
    ap.add_argument("--rows", type=int, default=500_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--batches", default="256,1024,4096,16384,65536")
    ap.add_argument("--http-batches", default="256,1024,16384,65536")
    ap.add_argument("--seconds", type=float, default=1.0, help="per in-process / HTTP case")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--client-batch", type=int, default=64)
    ap.add_argument("--throughput-seconds", type=float, default=5.0)
    ap.add_argument("--pooled-rows", type=int, default=2_000_000)
    ap.add_argument("--profile", action="store_true", help="torch profiler of cuda batch 1024")
    ap.add_argument("--skip", default="", help="comma list of: http,throughput,pooled")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "predict.json"))
    args = ap.parse_args()
    args.batch_list = [int(x) for x in args.batches.split(",")]
    args.http_list = [int(x) for x in args.http_batches.split(",") if x]
    skip = set(args.skip.split(","))
    devices = [d for d in args.devices.split(",") if d]
    RESULTS["setup"] = {k: v for k, v in vars(args).items() if k not in ("batch_list", "http_list")}
    RESULTS["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                          "torch_threads": torch.get_num_threads()}  # fmt: skip
    if "cuda" in devices:
        RESULTS["machine"]["gpu"] = torch.cuda.get_device_name(0)
    tmp = Path(tempfile.mkdtemp(prefix="bench-predict-"))
    broker = EmbeddedBroker(port=0, log_path=tmp / "broker.log").start()
    workers: dict[str, InferenceWorker] = {}
    servers: list[InferenceServer] = []
    try:
        cfg, tables, weights = build(args, tmp, broker.bootstrap_servers)
        for d in devices:
            workers[d] = start_worker(cfg, tmp / "store", d)
        in_process(args, cfg, tables, weights, workers)
        del weights
        state = (
            dense_state()
            if args.tables == 8
            else DLRMDense(NUM_DENSE, BOTTOM, TOP, args.tables).dense_state()
        )
        if "http" not in skip or "throughput" not in skip:
            by_dev: dict[str, InferenceServer] = {}
            unbatched: dict[str, InferenceServer] = {}
            for d, w in workers.items():
                for target, rows in ((by_dev, 8192), (unbatched, 0)):
                    s = InferenceServer(w, cfg, port=0, max_batch_rows=rows, max_queue_delay_ms=1.0)
                    s._on_dense(1, state)  # what the dense topic delivers, without its 1 MiB cap
                    target[d] = s.start()
                    servers.append(s)
            if "http" not in skip:
                http_latency(args, tables, by_dev)
            if "throughput" not in skip:
                tp: dict[str, InferenceServer] = {}
                for d in reversed(devices):
                    tp[f"{d} batched"] = by_dev[d]
                    tp[f"{d} unbatched"] = unbatched[d]
                throughput(args, tables, tp)
        if "cuda" in devices and "pooled" not in skip:
            pooled(args)
    finally:
        for s in servers:
            s.stop()
        for w in workers.values():
            w.stop()
        broker.stop()
    report()
    write_json(args.out, RESULTS)


if __name__ == "__main__":
    main()
