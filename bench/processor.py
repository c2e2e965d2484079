"""Processor into LMDB: rows/s of the processor's data path beside raw py-lmdb sorted putmulti.

The processor path per batch: ``validation.check_table_message`` of every message (decode and
every check, on the bytes as they come from Kafka), compaction (highest version per key, one
batched read of the stored versions of rows not newer than their partition's highest version)
and one write transaction of sorted rows, offsets and markers (:meth:`LmdbStore.write_batch`).
The ceiling, measured in the same run on the same disk with the same sync settings and the same
rows per transaction: build the ``(key, value)`` bytes of the batch's rows, sort them,
``putmulti`` them, commit. Beside it, the same with each row's version also put into a second
database (``raw+versions db``): the ceiling of a store that keeps versions apart from the rows.

Write cases (8): dim 64/128, float32/float16, uniform/Zipf keys, versions only growing (no
stored version is read). Read cases: a replay of stored rows at their versions and a mixed
stream (1/4 of the messages re-sent from the history), where the store reads stored versions;
each beside raw putmulti of the same rows after the same stored history. Then the read alone,
keys/s per way of reading the stored versions of the same keys in the same store.

Shards: 1, 2 and 4 separate processes, each writing its own environment (as one processor per
shard does), total rows/s beside the same number of raw putmulti processes.

    python bench/processor.py [--rows 400000] [--repeat 3] [--out bench/results/processor.json]
        [--dir DIR] [--no-sync] [--only write read shards]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lmdb
import numpy as np
from report import write_json

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


def run_pipeline(
    path: str,
    spec: TableSpec,
    messages: list[bytes],
    sync: bool,
    prefill: Sequence[bytes] = (),
    start: Any = None,
) -> dict[str, Any]:
    """The processor's data path over ``messages`` (after the stored history ``prefill``,
    written untimed). ``start``: a barrier waited on just before the timed part (shards)."""
    st = LmdbStore.open(path, readonly=False, map_size=1 << 32, sync=sync)
    st.ensure_tables({spec.name: spec})
    for lo in range(0, len(prefill), MESSAGES_PER_BATCH):  # the stored history, not timed
        batch = WriteBatch()
        for raw in prefill[lo : lo + MESSAGES_PER_BATCH]:
            m = wire.decode(raw)
            batch.table_rows(spec.name).add(m.keys, m.vectors, m.versions())
        st.write_batch(batch)
    rows_in = rows_written = 0
    if start is not None:
        start.wait()
    t0 = time.perf_counter()
    for lo in range(0, len(messages), MESSAGES_PER_BATCH):
        batch = WriteBatch()
        for i, raw in enumerate(messages[lo : lo + MESSAGES_PER_BATCH], start=lo):
            checked = check_table_message(raw, spec, 0, (spec.name,))
            if isinstance(checked, Rejected):
                raise AssertionError(f"bench messages must be valid: {checked}")
            batch.table_rows(spec.name).add(checked.keys, checked.vectors, checked.versions())
            batch.offsets[("bench." + spec.name, 0)] = i + 1
        res = st.write_batch(batch)[spec.name]
        rows_in += res.rows_in
        rows_written += res.rows_written
    dt = time.perf_counter() - t0
    st.close()
    return {"seconds": dt, "start": t0, "rows_in": rows_in, "rows_written": rows_written}


def run_raw(
    path: str,
    spec: TableSpec,
    messages: list[bytes],
    sync: bool,
    prefill: Sequence[bytes] = (),
    versions: bool = False,
    start: Any = None,
) -> dict[str, Any]:
    """The ceiling: sorted putmulti of the same rows, same rows per txn, same sync (after the
    same stored history, ``prefill``, written untimed). ``versions``: also putmulti each row's
    version (8 bytes) into a second database in the same txn: the ceiling of a store that keeps
    versions apart from the rows."""
    env = lmdb.open(path, map_size=1 << 32, sync=sync, max_dbs=4)
    db = env.open_db(b"rows")
    vdb = env.open_db(b"versions") if versions else None
    row = np.dtype([("v", "<i8"), ("x", spec.np_dtype, (spec.dim,))])
    _raw_put(env, db, vdb, row, [wire.decode(m) for m in prefill])
    decoded = [wire.decode(m) for m in messages]  # decoding is not part of the ceiling
    if start is not None:
        start.wait()
    t0 = time.perf_counter()
    rows = _raw_put(env, db, vdb, row, decoded)
    dt = time.perf_counter() - t0
    env.close()
    return {"seconds": dt, "start": t0, "rows_in": rows, "rows_written": rows}


def _raw_put(env: lmdb.Environment, db: Any, vdb: Any, row: np.dtype, decoded: list[Any]) -> int:
    rows = 0
    for lo in range(0, len(decoded), MESSAGES_PER_BATCH):
        part = decoded[lo : lo + MESSAGES_PER_BATCH]
        keys = np.concatenate([m.keys for m in part])
        order = np.argsort(keys, kind="stable")
        vals = np.empty(keys.size, row)
        vals["v"] = np.concatenate([m.versions() for m in part])[order]
        vals["x"] = np.concatenate([m.vectors for m in part])[order]
        enc = encode_keys(keys[order])
        with env.begin(write=True) as txn:
            txn.cursor(db).putmulti(zip(enc, vals.view(f"V{row.itemsize}").tolist(), strict=True))
            if vdb is not None:
                txn.cursor(vdb).putmulti(zip(enc, vals["v"].view("V8").tolist(), strict=True))
        rows += keys.size
    return rows


def make_read_case(
    spec: TableSpec, rows: int, kind: str, seed: int
) -> tuple[list[bytes], list[bytes]]:
    """``(stored history, timed stream)`` of a case whose stored versions must be read.

    ``replay``: ``rows`` rows of history, then the same messages again (every row at its stored
    version: all stale, as when a trainer restarted from a checkpoint re-publishes them).
    ``mixed``: ``rows`` rows of history, then batches of ``3/4`` new messages (newer versions:
    no read) and ``1/4`` messages re-sent from the history (their versions are read; they lose
    to the stored or newer rows).
    """
    if kind == "replay":
        history = make_messages(spec, rows, "uniform", seed)
        return history, history
    history = make_messages(spec, 2 * rows, "uniform", seed)
    half = len(history) // 2
    stored, fresh = history[:half], history[half:]
    rng = np.random.default_rng(seed + 1)
    old_per_batch = MESSAGES_PER_BATCH // 4
    new_per_batch = MESSAGES_PER_BATCH - old_per_batch
    timed: list[bytes] = []
    for lo in range(0, len(fresh), new_per_batch):
        timed += fresh[lo : lo + new_per_batch]
        timed += [stored[i] for i in rng.integers(0, half, size=old_per_batch)]
    return stored, timed


def asked_keys(spec: TableSpec, prefill: list[bytes], messages: list[bytes]) -> list[np.ndarray]:
    """Per write batch, the sorted keys whose stored versions the store reads (rows not above
    the highest version already written: the bench's tables have one partition)."""
    from streamhps.store.base import TableRows
    from streamhps.store.compaction import latest_per_key

    top = max((int(wire.decode(m).versions().max()) for m in prefill), default=-1)
    out = []
    for lo in range(0, len(messages), MESSAGES_PER_BATCH):
        rows = TableRows()
        for raw in messages[lo : lo + MESSAGES_PER_BATCH]:
            m = wire.decode(raw)
            rows.add(m.keys, m.vectors, m.versions())
        keys, _, versions, _ = latest_per_key(rows)
        out.append(keys[versions <= top])
        top = max(top, int(versions.max()))
    return out


def time_version_reads(path: str, spec: TableSpec, asked: list[np.ndarray]) -> dict[str, float]:
    """Keys/s of reading the stored versions of ``asked`` (one write txn per batch, aborted) in
    the store at ``path``, per way of reading them: whole rows copied to bytes (the store's
    read before this change), memoryviews into the map (``buffers=True``) with only the 8
    version bytes copied, an existence-only lookup (``getmulti(values=False)``: no value is
    touched, the floor of any per-key lookup), and 8-byte values of a separate database (a
    ``versions`` database built here, untimed)."""
    from operator import itemgetter

    second, head = itemgetter(1), itemgetter(slice(0, 8))
    rdt = np.dtype([("version", "<i8"), ("vector", spec.np_dtype, (spec.dim,))])
    env = lmdb.open(path, map_size=1 << 32, max_dbs=16, sync=False)
    db = env.open_db(f"rows:{spec.name}".encode(), create=False)
    try:  # the store's own (format 2)
        vdb = env.open_db(f"versions:{spec.name}".encode(), create=False)
    except lmdb.NotFoundError:  # a format 1 store: built here, as the store would keep it
        vdb = env.open_db(b"bench-versions")
        with env.begin(write=True) as txn:
            for k, v in txn.cursor(db):
                txn.put(k, v[:8], db=vdb)
    n = sum(a.size for a in asked)
    enc = [encode_keys(a) for a in asked]

    def whole(txn: lmdb.Transaction, e: list[bytes]) -> np.ndarray:
        hits = txn.cursor(db).getmulti(e)
        return np.frombuffer(b"".join(map(second, hits)), dtype=rdt)["version"]

    def views(txn: lmdb.Transaction, e: list[bytes]) -> np.ndarray:
        hits = txn.cursor(db).getmulti(e)
        return np.frombuffer(b"".join(map(head, map(second, hits))), dtype="<i8")

    def exists(txn: lmdb.Transaction, e: list[bytes]) -> np.ndarray:
        return np.asarray(txn.cursor(db).getmulti(e, values=False))

    def versions_db(txn: lmdb.Transaction, e: list[bytes]) -> np.ndarray:
        hits = txn.cursor(vdb).getmulti(e)
        return np.frombuffer(b"".join(map(second, hits)), dtype="<i8")

    ways = {
        "whole rows (bytes)": (whole, False),
        "memoryview, 8 bytes copied": (views, True),
        "existence only (values=False)": (exists, False),
        "versions db (8-byte values)": (versions_db, False),
    }
    out: dict[str, float] = {}
    got: dict[str, np.ndarray] = {}
    for name, (fn, buffers) in ways.items():
        best = float("inf")
        for _ in range(3):
            dt = 0.0
            parts = []
            for e in enc:
                read: lmdb.Transaction[Any] = (
                    env.begin(write=True, buffers=True) if buffers else env.begin(write=True)
                )
                with read:
                    t0 = time.perf_counter()
                    parts.append(fn(read, e))
                    dt += time.perf_counter() - t0
                    read.abort()
            best = min(best, dt)
        got[name] = np.concatenate(parts) if parts else np.zeros(0)
        out[name] = n / best
    env.close()
    ref = got["whole rows (bytes)"]
    for name in ("memoryview, 8 bytes copied", "versions db (8-byte values)"):
        if not np.array_equal(got[name], ref):
            raise AssertionError(f"{name} read other versions than the whole rows")
    return out


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
    # every shard's timed part starts together (after its own setup: the raw side's decoding)
    run = run_pipeline if kind == "processor" else run_raw
    r = run(path, spec, msgs, sync, start=barrier)
    q.put((r["start"], r["start"] + r["seconds"], r["rows_in"]))


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
    ap.add_argument(
        "--only",
        nargs="+",
        choices=("write", "read", "shards"),
        default=["write", "read", "shards"],
        help="which tables to measure (default all)",
    )
    args = ap.parse_args()
    sync = not args.no_sync
    base = Path(tempfile.mkdtemp(prefix="bench-processor-", dir=args.dir))
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "rows": args.rows, "rows_per_txn": ROWS_PER_MESSAGE * MESSAGES_PER_BATCH, "sync": sync,
        "key_space": KEY_SPACE, "configs": [], "shards": [], "read_configs": [], "version_reads": [],
    }  # fmt: skip
    try:
        if "write" in args.only:
            write_cases(args, base, sync, results)
        if "read" in args.only:
            read_cases(args, base, sync, results)
        if "shards" in args.only:
            shard_cases(args, base, sync, results)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print()
    write_json(args.out, results)


def write_cases(args: argparse.Namespace, base: Path, sync: bool, results: dict[str, Any]) -> None:
    """The 8 cases (dim 64/128, float32/float16, uniform/Zipf keys, versions growing), each
    beside raw putmulti and beside raw putmulti plus a putmulti of each row's version into a
    second database (what keeping versions apart from the rows would cost every write)."""
    print(
        f"{'dim':>4} {'dtype':>8} {'keys':>8} {'processor rows/s':>17} {'raw putmulti rows/s':>20} "
        f"{'ratio':>6} {'compaction':>10} {'raw+versions db':>16} {'/raw':>5}"
    )
    for dim in (64, 128):
        for dtype in ("float32", "float16"):
            for dist in ("uniform", "zipf"):
                spec = TableSpec("bench", dim=dim, dtype=dtype)
                msgs = make_messages(spec, args.rows, dist, seed=dim)
                tag = f"{dim}-{dtype}-{dist}"
                raws, pipes, vers = [], [], []
                for rep in range(args.repeat):  # interleaved, best of each: the disk is shared
                    raws.append(run_raw(str(base / f"raw-{tag}-{rep}"), spec, msgs, sync))
                    pipes.append(run_pipeline(str(base / f"proc-{tag}-{rep}"), spec, msgs, sync))
                    vers.append(
                        run_raw(str(base / f"rawv-{tag}-{rep}"), spec, msgs, sync, versions=True)
                    )
                raw = min(raws, key=lambda r: r["seconds"])
                pipe = min(pipes, key=lambda r: r["seconds"])
                ver = min(vers, key=lambda r: r["seconds"])
                p_rate = pipe["rows_in"] / pipe["seconds"]
                r_rate = raw["rows_in"] / raw["seconds"]
                v_rate = ver["rows_in"] / ver["seconds"]
                comp = pipe["rows_in"] / max(pipe["rows_written"], 1)
                results["configs"].append({
                    "dim": dim, "dtype": dtype, "keys": dist, "processor_rows_per_s": p_rate,
                    "raw_putmulti_rows_per_s": r_rate, "ratio": p_rate / r_rate,
                    "rows_in": pipe["rows_in"], "rows_written": pipe["rows_written"],
                    "compaction_ratio": comp, "raw_with_versions_db_rows_per_s": v_rate,
                })  # fmt: skip
                print(
                    f"{dim:>4} {dtype:>8} {dist:>8} {p_rate:>17,.0f} {r_rate:>20,.0f} "
                    f"{p_rate / r_rate:>6.2f} {comp:>9.2f}x {v_rate:>16,.0f} {v_rate / r_rate:>5.2f}"
                )
                for rep in range(args.repeat):
                    for side in ("raw", "proc", "rawv"):
                        shutil.rmtree(base / f"{side}-{tag}-{rep}", ignore_errors=True)


def shard_cases(args: argparse.Namespace, base: Path, sync: bool, results: dict[str, Any]) -> None:
    """1, 2 and 4 shard processes (dim 64 float32 uniform), total rows/s beside raw."""
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
        p = max(run_shards("processor", base / f"p{i}", spec, per_shard, n, sync) for i in range(2))
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


def read_cases(args: argparse.Namespace, base: Path, sync: bool, results: dict[str, Any]) -> None:
    """Cases whose stored versions are read (replay, mixed), each beside raw putmulti of the
    same rows after the same stored history, then the read alone, per way of reading."""
    print(
        f"\nread cases (uniform keys, after a stored history)\n{'dim':>4} {'dtype':>8} {'case':>7} "
        f"{'read':>6} {'processor rows/s':>17} {'raw putmulti rows/s':>20} {'ratio':>6} {'stale':>6}"
    )
    reads = []
    for dim in (64, 128):
        for kind in ("replay", "mixed"):
            spec = TableSpec("bench", dim=dim, dtype="float32")
            prefill, msgs = make_read_case(spec, args.rows, kind, seed=dim)
            tag = f"{dim}-{kind}"
            raws, pipes = [], []
            for rep in range(args.repeat):
                raws.append(run_raw(str(base / f"raw-{tag}-{rep}"), spec, msgs, sync, prefill))
                pipes.append(
                    run_pipeline(str(base / f"proc-{tag}-{rep}"), spec, msgs, sync, prefill)
                )
            raw = min(raws, key=lambda r: r["seconds"])
            pipe = min(pipes, key=lambda r: r["seconds"])
            p_rate = pipe["rows_in"] / pipe["seconds"]
            r_rate = raw["rows_in"] / raw["seconds"]
            asked = asked_keys(spec, prefill, msgs)
            n_asked = sum(a.size for a in asked)
            read_share = n_asked / pipe["rows_in"]
            stale = 1 - pipe["rows_written"] / pipe["rows_in"]
            results["read_configs"].append({
                "dim": dim, "dtype": "float32", "case": kind, "processor_rows_per_s": p_rate,
                "raw_putmulti_rows_per_s": r_rate, "ratio": p_rate / r_rate,
                "rows_in": pipe["rows_in"], "rows_written": pipe["rows_written"],
                "versions_read": n_asked,
            })  # fmt: skip
            print(
                f"{dim:>4} {'float32':>8} {kind:>7} {read_share:>6.0%} {p_rate:>17,.0f} {r_rate:>20,.0f} "
                f"{p_rate / r_rate:>6.2f} {stale:>6.0%}"
            )
            shutil.rmtree(base / f"raw-{tag}-0", ignore_errors=True)
            reads.append(
                (dim, kind, n_asked, time_version_reads(str(base / f"proc-{tag}-0"), spec, asked))
            )
    ways = list(reads[0][3])
    print("\nthe read alone: stored versions read per second (same keys, same stores)")
    print(f"{'dim':>4} {'case':>7} {'keys':>8} " + " ".join(f"{w:>30}" for w in ways))
    for dim, kind, n, rates in reads:
        print(f"{dim:>4} {kind:>7} {n:>8} " + " ".join(f"{rates[w]:>30,.0f}" for w in ways))
        results["version_reads"].append({"dim": dim, "case": kind, "keys": n, "keys_per_s": rates})


if __name__ == "__main__":
    main()
