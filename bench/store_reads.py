"""Store reads: keys/s of ``LmdbStore.get_many`` beside raw py-lmdb ``getmulti`` of the same keys.

A worker reads its cache misses and warms its cache with :meth:`LmdbStore.get_many` (one read
transaction, one batched ``getmulti`` per table). The ceiling, same store, same sorted keys:
one read transaction, ``getmulti``, the values joined into one buffer (what any reader must do
to hand rows to numpy). Beside it the same with ``buffers=True`` (memoryviews into the map in
place of copies: py-lmdb makes one per value).

    python bench/store_reads.py [--rows 300000] [--repeat 5] [--out bench/results/store_reads.json] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from operator import itemgetter
from pathlib import Path
from typing import Any

import lmdb
import numpy as np
from report import write_json

from streamhps.config import TableSpec
from streamhps.store import LmdbStore, WriteBatch
from streamhps.store.lmdb_format import encode_keys

KEY_SPACE = 1_000_000
_second = itemgetter(1)


def build(path: Path, spec: TableSpec, rows: int, seed: int) -> np.ndarray:
    """A store of ``rows`` random keys of ``spec``; returns the stored keys."""
    rng = np.random.default_rng(seed)
    keys = np.unique(rng.integers(0, KEY_SPACE, size=rows))
    with LmdbStore.open(path, readonly=False, map_size=1 << 32, sync=False) as st:
        st.ensure_tables({spec.name: spec})
        b = WriteBatch()
        vectors = rng.standard_normal((keys.size, spec.dim)).astype(spec.np_dtype)
        b.table_rows(spec.name).add(keys, vectors, np.ones(keys.size, np.int64))
        st.write_batch(b)
    return keys


def best_rate(fn: Any, n: int, repeat: int) -> float:
    fn()  # first touch of the pages is not measured
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return n / best


def measure(path: Path, keys: np.ndarray, repeat: int) -> tuple[float, float, float]:
    """keys/s of ``get_many``, of raw ``getmulti`` (copies), of raw ``getmulti`` (buffers)."""
    enc = encode_keys(keys)
    n = keys.size
    env = lmdb.open(str(path), readonly=True, lock=False, max_dbs=16)
    try:
        db = env.open_db(b"rows:bench", create=False)

        def raw(buffers: bool) -> bytes:
            txn = env.begin(buffers=True) if buffers else env.begin()
            with txn:
                return b"".join(map(_second, txn.cursor(db).getmulti(enc)))

        copy = best_rate(lambda: raw(False), n, repeat)
        views = best_rate(lambda: raw(True), n, repeat)
    finally:
        env.close()  # py-lmdb opens an environment once per process: the store's comes next
    with LmdbStore.open(path, readonly=True) as st:
        store = best_rate(lambda: st.get_many({"bench": keys}), n, repeat)
    return store, copy, views


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=300_000, help="stored rows per table")
    ap.add_argument("--repeat", type=int, default=5, help="runs per figure; best is reported")
    ap.add_argument("--dir", default=None, help="directory on the disk to measure")
    ap.add_argument("--out", default="bench/results/store_reads.json")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="bench-store-reads-", dir=args.dir))
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "rows": args.rows, "lmdb": lmdb.__version__, "cases": [],
    }  # fmt: skip
    print(
        f"{'dim':>4} {'dtype':>8} {'keys':>6} {'get_many keys/s':>16} "
        f"{'raw getmulti keys/s':>20} {'ratio':>6} {'buffers=True keys/s':>20}"
    )
    try:
        for dim in (64, 128):
            spec = TableSpec("bench", dim=dim, dtype="float32")
            path = base / f"s{dim}"
            stored = build(path, spec, args.rows, seed=dim)
            rng = np.random.default_rng(dim + 1)
            for n in (1024, 65536):
                keys = np.sort(rng.choice(stored, n, replace=False))
                store, copy, views = measure(path, keys, args.repeat)
                results["cases"].append({
                    "dim": dim, "dtype": "float32", "keys": n, "get_many_keys_per_s": store,
                    "raw_getmulti_keys_per_s": copy, "ratio": store / copy,
                    "buffers_getmulti_keys_per_s": views,
                })  # fmt: skip
                print(
                    f"{dim:>4} {'float32':>8} {n:>6} {store:>16,.0f} {copy:>20,.0f} "
                    f"{store / copy:>6.2f} {views:>20,.0f}"
                )
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print()
    write_json(args.out, results)


if __name__ == "__main__":
    main()
