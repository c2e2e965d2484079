"""The worker's apply path, piece by piece, beside what the same work costs at the least.

1. **Window insert** (``RecentRows.add``): rows of unique keys in applies of ``--sizes`` rows
   (dim ``--dim`` fp32, never pruned, as in ``bench/staleness.py``'s curve where no processor
   runs), ns per row and the slowest single insert, beside the ceiling: one copy of the
   apply's rows (``np.concatenate`` of its message arrays), the least a window that copies the
   rows pays once per merge level.
2. **Hot keys**: a key set rewritten message after message, one key per message only that
   message has: bytes the window keeps alive beside the bytes of its live rows.
3. **Lookup beside the stream writer** (numpy cache): p50/p99 of a 1024-key ``lookup`` every
   5 ms while another thread writes ``--write-rows``-row batches through ``upsert_async`` every
   20 ms, beside the same lookups with no writer (the ceiling), and the writer's ns per row.
   ``--gil-load N`` adds N threads of interpreted work to both phases (a worker's fetch thread
   wants the GIL too: a writer that held the cache lock while waiting for the GIL held every
   lookup with it). ``--writer-process`` adds two phases with the writer and that load in a
   forked process writing the same table in shared memory (the gate works across processes):
   what lookups would see if ingest ran outside the serving process's interpreter.
4. **Cold shared table**: ``--rows`` inserts into an empty table made by another mapping of a
   memory file (as a worker's ingest process gets its cache), without and with the child's
   prefault, beside a private table (the ceiling).

    python bench/ingest_apply.py [--out bench/results/ingest_apply.json]
"""

from __future__ import annotations

import argparse
import mmap
import multiprocessing as mp
import os
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from report import write_json

from streamhps.cache.numpy_backend import NumpyCache
from streamhps.worker.window import RecentRows, latest_rows

MESSAGES_PER_APPLY = 4


def window_inserts(size: int, total: int, dim: int) -> dict[str, Any]:
    rng = np.random.default_rng(size)
    keys_all = rng.permutation(20 * total).astype(np.int64)
    w = RecentRows(dim, np.dtype(np.float32), 1)
    per = size // MESSAGES_PER_APPLY
    add_s, copy_s, worst = 0.0, 0.0, 0.0
    n = 0
    for off in range(total // size):
        keys = keys_all[off * size : off * size + per * MESSAGES_PER_APPLY]
        arrays = [
            rng.standard_normal((per, dim), dtype=np.float32) for _ in range(MESSAGES_PER_APPLY)
        ]
        src = np.repeat(np.arange(MESSAGES_PER_APPLY, dtype=np.int32), per)
        row = np.tile(np.arange(per, dtype=np.int64), MESSAGES_PER_APPLY)
        sel = latest_rows(keys, np.ones(keys.shape[0], np.int64))
        m = sel.shape[0]
        t0 = time.perf_counter()
        np.concatenate(arrays)
        t1 = time.perf_counter()
        w.add(keys[sel], np.ones(m, np.int64), arrays, np.zeros(m, np.int32),
              np.full(m, off, np.int64), src=src[sel], row=row[sel])  # fmt: skip
        t2 = time.perf_counter()
        copy_s += t1 - t0
        add_s += t2 - t1
        worst = max(worst, t2 - t1)
        n += m
    return {"apply_rows": size, "rows": n, "insert_ns_per_row": add_s / n * 1e9,
            "copy_ns_per_row": copy_s / n * 1e9, "worst_insert_ms": worst * 1e3,
            "chunks": w.chunks}  # fmt: skip


def hot_keys(dim: int, per_msg: int = 512, messages: int = 64) -> dict[str, Any]:
    w = RecentRows(dim, np.dtype(np.float32), 1)
    hot = np.arange(per_msg, dtype=np.int64)
    for off in range(messages):
        keys = hot.copy()
        keys[0] = 1_000_000 + off
        vec = np.full((per_msg, dim), off, dtype=np.float32)
        w.add(keys, np.full(per_msg, off + 1, np.int64), [vec], np.zeros(per_msg, np.int32),
              np.full(per_msg, off, np.int64), src=np.zeros(per_msg, np.int32),
              row=np.arange(per_msg, dtype=np.int64))  # fmt: skip
    return {"messages": messages, "rows_per_message": per_msg, "live_rows": w.rows,
            "live_bytes": w.rows * dim * 4, "held_bytes": w.nbytes,
            "all_messages_bytes": messages * per_msg * dim * 4}  # fmt: skip


#: the phases of :func:`lookups_beside_writer`: (name, writer, where the writer and the
#: interpreted load run)
PHASES = (("idle", False, "here"), ("writing", True, "here"))
PROCESS_PHASES = (("idle, load in another process", False, "fork"),
                  ("writing from another process", True, "fork"))  # fmt: skip


def lookups_beside_writer(
    dim: int, write_rows: int, seconds: float, piece_rows: int | None, gil_load: int = 0,
    writer_process: bool = False,
) -> dict[str, Any]:  # fmt: skip
    cache = shared_cache(1 << 21, dim) if writer_process else NumpyCache(1 << 21, dim)
    if piece_rows:
        cache.write_piece_rows = piece_rows
    seed = np.arange(1 << 16, dtype=np.int64)
    cache.upsert(seed, np.ones((seed.shape[0], dim), np.float32), np.ones(seed.shape[0], np.int64))
    out: dict[str, Any] = {"write_rows": write_rows, "piece_rows": cache.write_piece_rows,
                           "gil_load": gil_load}  # fmt: skip
    for phase, writing, where in PHASES + (PROCESS_PHASES if writer_process else ()):
        stop = threading.Event()
        lat: list[float] = []
        child = None
        if where == "fork":  # forked before this process starts a thread of its own
            ctx = mp.get_context("fork")
            go, report = ctx.Event(), ctx.SimpleQueue()
            child = ctx.Process(
                target=_write_elsewhere,
                args=(cache, write_rows, dim, seconds, gil_load, writing, go, report),
            )
            child.start()

        def look(lat: list[float] = lat, stop: threading.Event = stop) -> None:
            r = np.random.default_rng(1)
            while not stop.is_set():
                k = r.integers(0, seed.shape[0], 1024)
                t0 = time.perf_counter()
                cache.lookup(k)
                lat.append(time.perf_counter() - t0)
                time.sleep(0.005)

        th = threading.Thread(target=look)
        th.start()
        if child is not None:
            go.set()
            wrote, write_s, last = report.get()
            child.join()
            if last is not None:  # the rows the other process wrote are this process's too
                seen = float(cache.lookup(last)[1].mean())
                assert seen > 0.99, f"{seen:.1%} of the other process's last rows seen here"
        else:
            busy = [threading.Thread(target=_python_load, args=(stop,)) for _ in range(gil_load)]
            for b in busy:
                b.start()
            wrote, write_s = _write_for(cache, write_rows, dim, seconds, writing)
        stop.set()
        th.join()
        if child is None:
            for b in busy:
                b.join()
        a = np.asarray(lat) * 1e3
        out[phase] = {"lookup_p50_ms": float(np.percentile(a, 50)),
                      "lookup_p99_ms": float(np.percentile(a, 99)), "lookups": int(a.size)}  # fmt: skip
        if wrote:
            out[phase]["write_ns_per_row"] = write_s / wrote * 1e9
    return out


_last_keys: list[np.ndarray] = []  # the keys of the last batch _write_for wrote


def _write_for(
    cache: NumpyCache, write_rows: int, dim: int, seconds: float, writing: bool
) -> tuple[int, float]:
    """``upsert_async`` of ``write_rows`` fresh keys every 20 ms for ``seconds`` (or only the
    sleeps); returns (rows written, seconds spent writing)."""
    rng = np.random.default_rng(0)
    vals = rng.standard_normal((write_rows, dim), dtype=np.float32)
    t_end, wrote, write_s, version = time.monotonic() + seconds, 0, 0.0, 2
    while time.monotonic() < t_end:
        if writing:
            keys = rng.choice(4_000_000, write_rows, replace=False).astype(np.int64)
            t0 = time.perf_counter()
            cache.upsert_async(keys, vals, np.full(write_rows, version, np.int64))
            _last_keys[:] = [keys]
            write_s += time.perf_counter() - t0
            wrote += write_rows
            version += 1
        time.sleep(0.02)
    return wrote, write_s


def _write_elsewhere(
    cache: NumpyCache, write_rows: int, dim: int, seconds: float, gil_load: int, writing: bool,
    go: Any, report: Any,
) -> None:  # fmt: skip
    """The writer and the interpreted load in a forked process, into the shared table."""
    stop = threading.Event()
    busy = [threading.Thread(target=_python_load, args=(stop,)) for _ in range(gil_load)]
    go.wait()
    for b in busy:
        b.start()
    wrote, write_s = _write_for(cache, write_rows, dim, seconds, writing)
    report.put((wrote, write_s, _last_keys[-1] if _last_keys else None))
    stop.set()
    for b in busy:
        b.join()


def shared_cache(capacity: int, dim: int) -> NumpyCache:
    """A cache whose table, gate and counters live in anonymous shared memory, so that a forked
    process reads and writes the same table (the gate's atomics work across processes: it is a
    ticket lock in memory both map). Sizes and counts stay per process."""
    return NumpyCache(capacity, dim, memory=mmap.mmap(-1, NumpyCache.table_bytes(capacity, dim)))


def cold_table_inserts(rows: int, dim: int) -> dict[str, Any]:
    """ns per row of ``rows`` inserts (``upsert_async``, batches of 25 000) into an empty table:
    a private one (the ceiling: its pages touched when made), and one made by another mapping of
    a memory file, as a worker's ingest process gets it (streamhps.worker.ingest_process), first
    without and then with the child's prefault (a read per page before the first insert)."""
    from streamhps.worker.ingest_process import Layout, SharedState, memory_file

    keys = np.random.default_rng(5).permutation(rows).astype(np.int64)
    vals = np.ones((rows, dim), np.float32)
    out: dict[str, Any] = {"rows": rows}
    for case in ("private", "shared", "shared_prefaulted"):
        if case == "private":
            c = NumpyCache(2 * rows, dim)
        else:
            layout = Layout.plan({"t": NumpyCache.table_bytes(2 * rows, dim)}, {})
            fd = memory_file(layout.total)
            NumpyCache(2 * rows, dim, memory=SharedState(fd, layout).cache_memory["t"])
            child = SharedState(fd, layout)  # the child's own mapping of the same file
            if case == "shared_prefaulted":
                child.prefault()
            c = NumpyCache(2 * rows, dim, memory=child.cache_memory["t"], attach=True)
            os.close(fd)
        t0 = time.perf_counter()
        for i in range(0, rows, 25_000):
            c.upsert_async(
                keys[i : i + 25_000], vals[i : i + 25_000], np.ones(min(25_000, rows - i), np.int64)
            )
        out[f"{case}_ns_per_row"] = (time.perf_counter() - t0) / rows * 1e9
    return out


def _python_load(stop: threading.Event) -> None:
    """A stand-in for the worker's fetch thread: ~0.5 ms of interpreted work, then ~0.5 ms
    asleep, so that the GIL is handed over as it is in a worker that ingests."""
    d: dict[int, int] = {}
    while not stop.is_set():
        t_end = time.perf_counter() + 0.0005
        while time.perf_counter() < t_end:
            for i in range(50):
                d[i] = d.get(i, 0) + 1
        time.sleep(0.0005)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 40000])
    ap.add_argument("--rows", type=int, default=400_000, help="rows inserted per window case")
    ap.add_argument("--write-rows", type=int, default=40_000)
    ap.add_argument("--piece-rows", type=int, nargs="+", default=[0],
                    help="write_piece_rows to try (0: the default)")  # fmt: skip
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--gil-load", type=int, default=0,
                    help="threads of interpreted work beside the lookups (as a worker's fetch thread)")  # fmt: skip
    ap.add_argument("--writer-process", action="store_true",
                    help="also: the writer and the interpreted load in a forked process, writing "
                         "the same table in shared memory (what lookups would see with ingest "
                         "out of the serving process)")  # fmt: skip
    ap.add_argument("--switch-interval", type=float, default=0.0001,
                    help="sys.setswitchinterval, as a worker sets it (serving.switch_interval_ms)")  # fmt: skip
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "ingest_apply.json"))
    args = ap.parse_args()
    sys.setswitchinterval(args.switch_interval)
    res: dict[str, Any] = {"benchmark": "ingest_apply", "machine": platform.platform(),
                           "cpu_count": os.cpu_count(), "args": vars(args)}  # fmt: skip
    res["window"] = [window_inserts(s, args.rows, args.dim) for s in args.sizes]
    print("window insert (unique keys, never pruned) beside one copy of the apply's rows")
    print("| apply rows | insert ns/row | copy ns/row (ceiling) | slowest insert ms | chunks |")
    print("|---|---|---|---|---|")
    for r in res["window"]:
        print(f"| {r['apply_rows']:,} | {r['insert_ns_per_row']:.0f} | {r['copy_ns_per_row']:.0f}"
              f" | {r['worst_insert_ms']:.2f} | {r['chunks']} |")  # fmt: skip
    h = res["hot_keys"] = hot_keys(args.dim)
    print(f"\nhot keys: {h['messages']} messages x {h['rows_per_message']} rows, {h['live_rows']} "
          f"live rows ({h['live_bytes']:,} B): window holds {h['held_bytes']:,} B "
          f"(every message whole: {h['all_messages_bytes']:,} B)")  # fmt: skip
    res["lookups"] = [
        lookups_beside_writer(
            args.dim, args.write_rows, args.seconds, pr or None, args.gil_load, args.writer_process
        )  # fmt: skip
        for pr in args.piece_rows
    ]
    print(f"\nnumpy cache lookup (1024 keys every 5 ms) beside upsert_async of {args.write_rows:,} "
          f"rows every 20 ms; {args.gil_load} thread(s) of interpreted work beside both phases")  # fmt: skip
    print("| pieces of | phase | lookup p50 ms | lookup p99 ms | writer ns/row |")
    print("|---|---|---|---|---|")
    for lk in res["lookups"]:
        for phase, _, _ in PHASES + (PROCESS_PHASES if args.writer_process else ()):
            r = lk[phase]
            wr = f"{r['write_ns_per_row']:.0f}" if "write_ns_per_row" in r else "-"
            print(f"| {lk['piece_rows']} | {phase}{' (ceiling)' if phase == 'idle' else ''} | "
                  f"{r['lookup_p50_ms']:.2f} | {r['lookup_p99_ms']:.2f} | {wr} |")  # fmt: skip
    c = res["cold_table"] = cold_table_inserts(args.rows, args.dim)
    print(f"\ninserts of {c['rows']:,} rows into an empty table, ns/row: private "
          f"{c['private_ns_per_row']:.0f} (ceiling); another process's mapping of a memory file "
          f"{c['shared_ns_per_row']:.0f}, prefaulted {c['shared_prefaulted_ns_per_row']:.0f}")  # fmt: skip
    print()
    write_json(args.out, res)


if __name__ == "__main__":
    main()
