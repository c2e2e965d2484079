"""Processor into LMDB: rows/s of the processor's data path beside raw py-lmdb sorted putmulti.

The processor path per batch: ``validation.check_table_message`` of every message (decode and
every check, on the bytes as they come from Kafka), compaction (highest version per key, one batched read of the stored
versions) and one write transaction of sorted rows, offsets and markers
(:meth:`LmdbStore.write_batch`). The ceiling, measured in the same run on the same disk with
the same sync settings and the same rows per transaction: build the ``(key, value)`` bytes of
the batch's rows, sort them, ``putmulti`` them, commit.

Shards: 1, 2 and 4 separate processes, each writing its own environment (as one processor per
shard does), total rows/s beside the same number of raw putmulti processes.

    python bench/processor.py [--rows 400000] [--repeat 3] [--out bench/results/processor.json] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import lmdb
import numpy as np

from streamhps import wire
from streamhps.config import TableSpec
from streamhps.store import LmdbStore, WriteBatch
from streamhps.store.lmdb_format import encode_keys
from streamhps.validation import Rejected, check_table_message

KEY_SPACE = 1_000_000
ROWS_PER_MESSAGE = 1024
MESSAGES_PER_BATCH = 64  # 65 536 rows per write transaction


def make_messages(spec: TableSpec, rows: int, dist: str, seed: int) -> list[bytes]:
    """Encoded update messages (unique keys inside a message, repeats across messages)."""
    rng = np.random.default_rng(seed)
    out = []
    for version in range(1, rows // ROWS_PER_MESSAGE + 1):
        if dist == "zipf":
            keys = np.unique(rng.zipf(1.1, size=ROWS_PER_MESSAGE * 2) % KEY_SPACE)[
                :ROWS_PER_MESSAGE
            ]
            keys = rng.permutation(keys)
        else:
            keys = np.unique(rng.integers(0, KEY_SPACE, size=ROWS_PER_MESSAGE + 64))[
                :ROWS_PER_MESSAGE
            ]
            keys = rng.permutation(keys)
        vec = rng.standard_normal((keys.size, spec.dim)).astype(spec.np_dtype)
        out.append(wire.encode_update(spec.name, keys, vec, version))
    return out


def run_pipeline(path: str, spec: TableSpec, messages: list[bytes], sync: bool) -> dict[str, Any]:
    st = LmdbStore.open(path, readonly=False, map_size=1 << 32, sync=sync)
    st.ensure_tables({spec.name: spec})
    rows_in = rows_written = 0
    t0 = time.perf_counter()
    for lo in range(0, len(messages), MESSAGES_PER_BATCH):
        batch = WriteBatch()
        for i, raw in enumerate(messages[lo : lo + MESSAGES_PER_BATCH], start=lo):
            m = check_table_message(raw, spec, 0, (spec.name,))
            if isinstance(m, Rejected):
                raise AssertionError(f"bench messages must be valid: {m}")
            batch.table_rows(spec.name).add(m.keys, m.vectors, m.versions())
            batch.offsets[("bench." + spec.name, 0)] = i + 1
        res = st.write_batch(batch)[spec.name]
        rows_in += res.rows_in
        rows_written += res.rows_written
    dt = time.perf_counter() - t0
    st.close()
    return {"seconds": dt, "rows_in": rows_in, "rows_written": rows_written}


def run_raw(path: str, spec: TableSpec, messages: list[bytes], sync: bool) -> dict[str, Any]:
    """The ceiling: sorted putmulti of the same rows, same rows per txn, same sync."""
    decoded = [wire.decode(m) for m in messages]  # decoding is not part of the ceiling
    env = lmdb.open(path, map_size=1 << 32, sync=sync, max_dbs=4)
    db = env.open_db(b"rows")
    row = np.dtype([("v", "<i8"), ("x", spec.np_dtype, (spec.dim,))])
    rows = 0
    t0 = time.perf_counter()
    for lo in range(0, len(decoded), MESSAGES_PER_BATCH):
        part = decoded[lo : lo + MESSAGES_PER_BATCH]
        keys = np.concatenate([m.keys for m in part])
        order = np.argsort(keys, kind="stable")
        vals = np.empty(keys.size, row)
        vals["v"] = np.concatenate([m.versions() for m in part])[order]
        vals["x"] = np.concatenate([m.vectors for m in part])[order]
        with env.begin(write=True, db=db) as txn:
            txn.cursor().putmulti(
                zip(encode_keys(keys[order]), vals.view(f"V{row.itemsize}").tolist(), strict=True)
            )
        rows += keys.size
    dt = time.perf_counter() - t0
    env.close()
    return {"seconds": dt, "rows_in": rows, "rows_written": rows}


def _shard_worker(
    kind: str,
    path: str,
    spec_d: dict[str, Any],
    rows: int,
    seed: int,
    sync: bool,
    barrier: Any,
    q: Any,
) -> None:
    spec = TableSpec(**spec_d)
    msgs = make_messages(spec, rows, "uniform", seed)
    barrier.wait()
    t0 = time.perf_counter()
    r = (run_pipeline if kind == "processor" else run_raw)(path, spec, msgs, sync)
    q.put((t0, time.perf_counter(), r["rows_in"]))


def run_shards(
    kind: str, base: Path, spec: TableSpec, rows_per_shard: int, shards: int, sync: bool
) -> float:
    base.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(shards)
    q = ctx.Queue()
    from dataclasses import asdict

    procs = [
        ctx.Process(
            target=_shard_worker,
            args=(
                kind,
                str(base / f"{kind}-{shards}-{i}"),
                asdict(spec),
                rows_per_shard,
                i,
                sync,
                barrier,
                q,
            ),
        )
        for i in range(shards)
    ]
    for p in procs:
        p.start()
    res = [q.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    start = min(r[0] for r in res)
    end = max(r[1] for r in res)
    return sum(r[2] for r in res) / (end - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--rows", type=int, default=400_000, help="rows per configuration (default 400k)"
    )
    ap.add_argument(
        "--repeat", type=int, default=3, help="runs per side, interleaved; best is reported"
    )
    ap.add_argument(
        "--dir", default=None, help="directory on the disk to measure (default: a temp dir)"
    )
    ap.add_argument("--out", default="bench/results/processor.json")
    ap.add_argument(
        "--no-sync",
        action="store_true",
        help="sync=False for both sides (default: sync, the safe default)",
    )
    args = ap.parse_args()
    sync = not args.no_sync
    base = Path(tempfile.mkdtemp(prefix="bench-processor-", dir=args.dir))
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "rows": args.rows, "rows_per_txn": ROWS_PER_MESSAGE * MESSAGES_PER_BATCH, "sync": sync,
        "key_space": KEY_SPACE, "configs": [], "shards": [],
    }  # fmt: skip
    try:
        print(
            f"{'dim':>4} {'dtype':>8} {'keys':>8} {'processor rows/s':>17} {'raw putmulti rows/s':>20} {'ratio':>6} {'compaction':>10}"
        )
        for dim in (64, 128):
            for dtype in ("float32", "float16"):
                for dist in ("uniform", "zipf"):
                    spec = TableSpec("bench", dim=dim, dtype=dtype)
                    msgs = make_messages(spec, args.rows, dist, seed=dim)
                    tag = f"{dim}-{dtype}-{dist}"
                    raws, pipes = [], []
                    for rep in range(args.repeat):  # interleaved, best of each: the disk is shared
                        raws.append(run_raw(str(base / f"raw-{tag}-{rep}"), spec, msgs, sync))
                        pipes.append(
                            run_pipeline(str(base / f"proc-{tag}-{rep}"), spec, msgs, sync)
                        )
                    raw = min(raws, key=lambda r: r["seconds"])
                    pipe = min(pipes, key=lambda r: r["seconds"])
                    p_rate = pipe["rows_in"] / pipe["seconds"]
                    r_rate = raw["rows_in"] / raw["seconds"]
                    comp = pipe["rows_in"] / max(pipe["rows_written"], 1)
                    results["configs"].append({
                        "dim": dim, "dtype": dtype, "keys": dist, "processor_rows_per_s": p_rate,
                        "raw_putmulti_rows_per_s": r_rate, "ratio": p_rate / r_rate,
                        "rows_in": pipe["rows_in"], "rows_written": pipe["rows_written"], "compaction_ratio": comp,
                    })  # fmt: skip
                    print(
                        f"{dim:>4} {dtype:>8} {dist:>8} {p_rate:>17,.0f} {r_rate:>20,.0f} {p_rate / r_rate:>6.2f} {comp:>9.2f}x"
                    )
        spec = TableSpec("bench", dim=64, dtype="float32")
        per_shard = max(args.rows // 2, ROWS_PER_MESSAGE * MESSAGES_PER_BATCH)
        print(
            f"\nshards (separate processes, dim 64 float32 uniform, {per_shard} rows each, {os.cpu_count()} cpus)"
        )
        print(
            f"{'shards':>6} {'processor rows/s':>17} {'raw putmulti rows/s':>20} {'ratio':>6} {'scaling':>8}"
        )
        one = None
        for n in (1, 2, 4):
            p = max(
                run_shards("processor", base / f"p{i}", spec, per_shard, n, sync) for i in range(2)
            )
            r = max(run_shards("raw", base / f"r{i}", spec, per_shard, n, sync) for i in range(2))
            one = one or p
            results["shards"].append(
                {
                    "shards": n,
                    "processor_rows_per_s": p,
                    "raw_putmulti_rows_per_s": r,
                    "ratio": p / r,
                    "scaling_vs_1": p / one,
                }
            )
            print(f"{n:>6} {p:>17,.0f} {r:>20,.0f} {p / r:>6.2f} {p / one:>7.2f}x")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
