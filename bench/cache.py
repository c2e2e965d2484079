"""Embedding-cache benchmark: lookup and upsert rates beside their ceilings, measured in one run.

GPU (``--gpu``, needs CuPy and torch with CUDA): for dim 64/128, float32/float16, uniform and
Zipf(1.05) keys and hit rates 100/90/75/50 %: the fused ``cache.lookup`` (probe + gather +
score update, through the public API) beside ``torch.index_select`` of the same rows out of
the same value array, and the device-to-device copy bandwidth measured at the start (read +
write bytes). Upsert: updates of resident keys, and inserts into an empty cache.

CPU (always): the numpy backend's lookup/upsert rates beside ``np.take`` of the same rows.

    python bench/cache.py [--gpu] [--out bench/results/cache.json] [--quick]

Rates are rows per second; "eff GB/s" counts the row bytes read and written (2 x row bytes per
row), the same count as the copy ceiling, so "% copy" is the share of the HBM copy rate.
"""

# ruff: noqa: B023 - timing closures run at once, inside their loop iteration
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, cast

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streamhps.cache import make_cache, memory_estimate  # noqa: E402
from streamhps.cache.cuda_backend import CudaCache  # noqa: E402
from streamhps.cache.numpy_backend import NumpyCache  # noqa: E402

RESULTS: dict[str, Any] = {"gpu": [], "cpu": [], "ceilings": {}}


def fmt_rate(r: float) -> str:
    return f"{r / 1e9:.2f} G" if r >= 1e9 else f"{r / 1e6:.1f} M"


# ---------------------------------------------------------------------------- GPU
def gpu_bench(quick: bool) -> None:
    import cupy as cp
    import torch

    dev = cp.cuda.Device()
    props = cp.cuda.runtime.getDeviceProperties(dev.id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    RESULTS["device"] = name
    print(
        f"device: {name}, {props['multiProcessorCount']} SMs, L2 {props['l2CacheSize'] >> 20} MiB"
    )

    def time_gpu(fn, reps: int = 20, warm: int = 3) -> float:
        """Seconds per call: events on the null stream around `reps` calls, median of 5."""
        for _ in range(warm):
            fn()
        cp.cuda.Device().synchronize()
        ts = []
        for _ in range(5):
            s, e = cp.cuda.Event(), cp.cuda.Event()
            s.record()
            for _ in range(reps):
                fn()
            e.record()
            e.synchronize()
            ts.append(cp.cuda.get_elapsed_time(s, e) / 1e3 / reps)
        return float(np.median(ts))

    # the ceiling: a large device-to-device copy
    a = cp.random.random(512 * 1024**2 // 8 * 4, dtype=cp.float64)  # 2 GiB
    b = cp.empty_like(a)
    t = time_gpu(lambda: b.__setitem__(Ellipsis, a), reps=10)
    copy_bps = 2 * a.nbytes / t
    RESULTS["ceilings"]["hbm_copy_GBps"] = copy_bps / 1e9
    print(f"HBM copy (read+write): {copy_bps / 1e9:.0f} GB/s")
    a = b = None
    cp.get_default_memory_pool().free_all_blocks()

    batch = 1 << 20 if quick else 1 << 21
    capacity = 4_000_000 if quick else 8_000_000
    rng = cp.random.default_rng(0)
    configs = [(128, "float32"), (64, "float32"), (128, "float16"), (64, "float16")]
    if quick:
        configs = configs[:2]
    hit_rates = (1.0, 0.9, 0.75, 0.5)
    print(
        f"\n{'dim':>4} {'dtype':>8} {'keys':>8} {'hit%':>5} | {'lookup rows/s':>13} {'eff GB/s':>8}"
        f" {'% copy':>6} | {'index_select':>12} {'% copy':>6} | {'speedup':>7}"
    )
    for dim, dtype in configs:
        est = memory_estimate(capacity, dim, dtype, "cuda")
        # the cuda backend itself: its slot lookup (_find) and row array are measured too
        cache = cast(CudaCache, make_cache("cuda", capacity=capacity, dim=dim, dtype=dtype))
        row_bytes = dim * np.dtype(dtype).itemsize
        # inserts into an empty cache, batch by batch, up to 75 % load
        keys_all = cp.unique(rng.integers(0, 1 << 62, size=int(cache.capacity * 0.8)))
        keys_all = keys_all[cp.asarray(np.random.default_rng(1).permutation(len(keys_all)))]
        n_fill = int(cache.capacity * 0.75)
        keys_fill = keys_all[:n_fill]
        vals = rng.standard_normal((batch, dim), dtype=cp.float32).astype(dtype)
        warm = make_cache("cuda", capacity=1 << 16, dim=dim, dtype=dtype)  # compile, load
        warm.upsert(keys_all[:1000], vals[:1000], cp.ones(1000, dtype=cp.int64))
        cp.cuda.Device().synchronize()
        t0 = time.perf_counter()
        n_ins = 0
        for i in range(0, n_fill - batch + 1, batch):
            k = keys_fill[i : i + batch]
            n_ins += cache.upsert(k, vals, cp.full(batch, 1, dtype=cp.int64))
        t_ins = time.perf_counter() - t0
        ins_rate = n_ins / t_ins
        st = cache.stats()
        # resident keys (some inserts evicted others in full buckets)
        _, hit = cache.get_versions(keys_fill)
        resident = keys_fill[hit]
        absent_keys = keys_all[n_fill:]
        ver = [2]

        def upd(k=resident[:batch]):
            ver[0] += 1
            cache.upsert(k, vals, cp.full(batch, ver[0], dtype=cp.int64))

        t_upd = time_gpu(upd, reps=5, warm=1)
        # torch.index_copy_ of the same rows into the same array: the scatter ceiling
        slot_of = cache._find(resident[:batch])  # noqa: SLF001 - the rows the cache holds
        tv = torch.from_dlpack(cache._vals)  # noqa: SLF001
        tslots = torch.from_dlpack(slot_of)
        tvals = torch.from_dlpack(vals)
        t_scat = time_gpu(lambda: tv.index_copy_(0, tslots, tvals), reps=5, warm=1)
        row = {
            "dim": dim,
            "dtype": dtype,
            "capacity": cache.capacity,
            "memory_bytes": st["memory_bytes"],
            "memory_estimate": est,
            "insert_rows_per_s": ins_rate,
            "insert_evictions": st["evictions"],
            "insert_dropped": st["dropped"],
            "update_rows_per_s": batch / t_upd,
            "index_copy_rows_per_s": batch / t_scat,
            "lookups": [],
        }
        print(
            f"{dim:>4} {dtype:>8} upsert: insert {fmt_rate(ins_rate)}rows/s (incl. host loop), "
            f"update {fmt_rate(batch / t_upd)}rows/s, torch index_copy_ {fmt_rate(batch / t_scat)}rows/s"
        )
        # zipf ranks over the resident keys
        nres = len(resident)
        ranks = cp.arange(1, nres + 1, dtype=cp.float64) ** -1.05
        cdf = cp.cumsum(ranks)
        cdf /= cdf[-1]
        for dist in ("uniform", "zipf"):
            for h in hit_rates:
                n_hit = int(batch * h)
                if dist == "uniform":
                    idx = rng.integers(0, nres, size=n_hit)
                else:
                    idx = cp.minimum(cp.searchsorted(cdf, rng.random(n_hit)), nres - 1)
                q = cp.concatenate(
                    [resident[idx], absent_keys[rng.integers(0, len(absent_keys), batch - n_hit)]]
                )
                q = q[cp.random.permutation(batch)]
                out, hit = cache.lookup(q)
                assert abs(float(hit.mean()) - h) < 1e-3
                t_lk = time_gpu(lambda q=q: cache.lookup(q))
                slots = cp.maximum(cache._find(q), 0)  # noqa: SLF001 - same rows, hits only
                ts = torch.from_dlpack(slots)
                tout = torch.empty((batch, dim), dtype=tv.dtype, device=tv.device)
                t_is = time_gpu(lambda ts=ts, tout=tout: torch.index_select(tv, 0, ts, out=tout))
                lk, isel = batch / t_lk, batch / t_is
                eff = lk * 2 * row_bytes
                r = {
                    "keys": dist,
                    "hit_rate": h,
                    "batch": batch,
                    "lookup_rows_per_s": lk,
                    "lookup_eff_GBps": eff / 1e9,
                    "lookup_pct_copy": 100 * eff / copy_bps,
                    "index_select_rows_per_s": isel,
                    "index_select_pct_copy": 100 * isel * 2 * row_bytes / copy_bps,
                    "speedup_vs_index_select": lk / isel,
                }
                row["lookups"].append(r)
                print(
                    f"{dim:>4} {dtype:>8} {dist:>8} {100 * h:>4.0f}% | {fmt_rate(lk):>12}"
                    f" {eff / 1e9:>8.0f} {r['lookup_pct_copy']:>5.0f}% | {fmt_rate(isel):>11}"
                    f" {r['index_select_pct_copy']:>5.0f}% | {lk / isel:>6.2f}x"
                )
        RESULTS["gpu"].append(row)
        # drop the references so that the memory pool can free their blocks
        cache = tv = keys_all = keys_fill = resident = vals = None  # type: ignore[assignment]
        cp.get_default_memory_pool().free_all_blocks()

    # small-batch latency through the API (host keys in, device rows out, synchronised)
    cache = cast(CudaCache, make_cache("cuda", capacity=1 << 20, dim=128, dtype="float32"))
    keys = np.arange(1 << 19, dtype=np.int64)
    cache.upsert(keys, np.ones((len(keys), 128), np.float32), np.ones(len(keys), np.int64))
    lat = {}
    for bs in (1024, 16384):
        q = keys[np.random.default_rng(bs).integers(0, len(keys), bs)]
        times: list[float] = []
        for i in range(300):
            t0 = time.perf_counter()
            out, hit = cache.lookup(q)
            cache.stream.synchronize()
            if i >= 20:
                times.append(time.perf_counter() - t0)
        lat[bs] = {
            "p50_us": 1e6 * np.percentile(times, 50),
            "p99_us": 1e6 * np.percentile(times, 99),
        }
        print(
            f"lookup latency batch {bs} (host keys, sync): p50 {lat[bs]['p50_us']:.0f} us, p99 {lat[bs]['p99_us']:.0f} us"
        )
    RESULTS["gpu_latency"] = lat


# ---------------------------------------------------------------------------- CPU
def cpu_bench(quick: bool) -> None:
    capacity = 1 << 20
    batch = 1 << 16
    print(
        f"\nnumpy backend ({platform.processor() or platform.machine()}, 1 thread), batch {batch}"
    )
    print(
        f"{'dim':>4} {'dtype':>8} | {'lookup':>10} {'np.take':>10} {'ratio':>6} | {'update':>10} {'insert':>10}"
    )
    for dim in (64, 128):
        dtype = "float32"
        cache = cast(NumpyCache, make_cache("numpy", capacity=capacity, dim=dim, dtype=dtype))
        rng = np.random.default_rng(dim)
        keys = np.unique(rng.integers(0, 1 << 62, size=int(cache.capacity * 0.7)))
        rng.shuffle(keys)
        vals = rng.standard_normal((batch, dim)).astype(dtype)
        t0 = time.perf_counter()
        for i in range(0, len(keys) - batch + 1, batch):
            cache.upsert(keys[i : i + batch], vals, np.ones(batch, np.int64))
        n_ins = (len(keys) // batch) * batch
        ins = n_ins / (time.perf_counter() - t0)
        _, hit = cache.get_versions(keys)
        resident = keys[hit]

        def med(fn, reps: int = 5 if quick else 15) -> float:
            fn()
            ts = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            return float(np.median(ts))

        q = resident[rng.integers(0, len(resident), batch)]
        t_lk = med(lambda: cache.lookup(q))
        slots = cache._find(q)[0]  # noqa: SLF001 - the same rows
        t_take = med(lambda: np.take(cache._vals, slots, axis=0))  # noqa: SLF001
        v = [1]

        def upd() -> None:
            v[0] += 1
            cache.upsert(q, vals, np.full(batch, v[0], np.int64))

        t_up = med(upd)
        r = {
            "dim": dim,
            "dtype": dtype,
            "batch": batch,
            "lookup_rows_per_s": batch / t_lk,
            "np_take_rows_per_s": batch / t_take,
            "update_rows_per_s": batch / t_up,
            "insert_rows_per_s": ins,
        }
        RESULTS["cpu"].append(r)
        print(
            f"{dim:>4} {dtype:>8} | {fmt_rate(batch / t_lk):>10} {fmt_rate(batch / t_take):>10}"
            f" {t_take / t_lk:>5.2f}x | {fmt_rate(batch / t_up):>10} {fmt_rate(ins):>10}"
        )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--gpu", action="store_true", help="run the CUDA backend part (needs a GPU)")
    p.add_argument("--cpu", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--quick", action="store_true", help="smaller sizes, fewer configurations")
    p.add_argument("--out", default=os.path.join("bench", "results", "cache.json"))
    args = p.parse_args()
    if args.gpu:
        gpu_bench(args.quick)
    if args.cpu:
        cpu_bench(args.quick)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(RESULTS, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
