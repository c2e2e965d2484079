"""Processor hosting: today's plain consumer loop beside the faust-hosted one, in one run.

Both sides run the same data path (:class:`streamhps.processor.Processor`: rows + offsets in
one LMDB transaction, every partition assigned at its LMDB offset) as a subprocess on the same
embedded broker and the same messages:

* **plain**: the loop in a thread of a bare process with SIGTERM/SIGINT handlers (how
  ``streamhps processor`` ran before faust hosted it; ``--plain-child`` below);
* **faust**: ``python -m streamhps processor``, the faust worker that runs the loop as a
  ``mode.Service`` with a web server (``/metrics``) and a progress timer.

Measured, each side ``--repeat`` times, interleaved (the 2-core machine is shared):

1. **rows/s into LMDB**: a fresh store, the topic already holding every message; rows counted
   by the store between its first commit and the commit that reaches the end offsets (both
   seen by polling the store from outside every 5 ms). Best and median of the rounds (the
   machine is shared: single runs of either side vary by +-20 %), and rows per CPU-second of
   the processor process over the same window.
2. **resume after kill -9**: another fresh store; the processor is SIGKILLed while consuming,
   at 25 %, 50 % and 75 % of the offsets (the kills that still leave a backlog: one batch
   takes up to ``batch_max_messages``), and restarted at once. Resume = process start of the
   restart to the first LMDB commit past the offsets stored at the kill; caught up = to the
   end offsets (after the last kill). Median and worst of every kill.
3. **lost / replayed rows against an oracle**: after the last restart caught up, every key's
   stored version and vector must equal the latest published one (``lost``: keys that differ);
   ``replayed``: rows the store counted in beyond the rows published (a batch applied twice
   would count its rows twice; versions would make it harmless, the count shows it).

The plain loop is the faust-hosted loop's ceiling. Criteria (issue 11): faust rows/s >= 90 % of
plain (best of the rounds, as ``bench/processor.py`` reports), resume <= 2 s, 0 lost, 0 replayed.

    flock /tmp/streamhps-heavy.lock python bench/processor_faust.py [--rows 1500000] [--repeat 4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import Consumer, TopicPartition

from streamhps import Publisher
from streamhps.broker import EmbeddedBroker
from streamhps.config import TableSpec
from streamhps.errors import StoreError
from streamhps.processes import stop_process
from streamhps.store import LmdbStore

TABLE = "bench"
DIM = 64
PARTITIONS = 2
KEY_SPACE = 200_000
ROWS_PER_VERSION = 50_000
POLL_S = 0.005
KILL_AT = (0.25, 0.5, 0.75)
REPO = Path(__file__).resolve().parent.parent


class Oracle:
    """Latest published version and vector of every key."""

    def __init__(self) -> None:
        self.versions = np.zeros(KEY_SPACE, np.int64)
        self.vectors = np.zeros((KEY_SPACE, DIM), np.float32)
        self.rows = 0

    def apply(self, keys: np.ndarray, vectors: np.ndarray, version: int) -> None:
        self.versions[keys] = version  # versions only grow here
        self.vectors[keys] = vectors
        self.rows += keys.size

    def check(self, store: Path) -> dict[str, int]:
        keys = np.arange(KEY_SPACE)
        with LmdbStore.open(store, readonly=True) as st:
            values, versions, found = st.get(TABLE, keys)
            rows_in = st.stats()["tables"][TABLE]["compaction"]["rows_in"]
        want = self.versions > 0
        wrong = (found != want) | (versions != self.versions)
        wrong |= want & found & ~(values == self.vectors).all(axis=1)
        return {"lost": int(wrong.sum()), "replayed": int(rows_in - self.rows)}


def publish(bootstrap: str, prefix: str, rows: int) -> tuple[Oracle, dict[tuple[str, int], int]]:
    spec = TableSpec(TABLE, dim=DIM, partitions=PARTITIONS)
    rng = np.random.default_rng(11)
    oracle = Oracle()
    with Publisher(bootstrap, [spec], prefix, kafka_config={"linger.ms": 5}) as pub:
        pub.create_topics()
        for v in range(1, rows // ROWS_PER_VERSION + 1):
            keys = rng.choice(KEY_SPACE, size=ROWS_PER_VERSION, replace=False)
            vec = rng.standard_normal((keys.size, DIM)).astype(np.float32)
            pub.publish(TABLE, keys, vec, version=v)
            pub.commit(v)
            oracle.apply(keys, vec, v)
        pub.flush()
    topic = f"{prefix}.{TABLE}"
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"{prefix}-ends"})
    ends = {
        (topic, p): c.get_watermark_offsets(TopicPartition(topic, p), 10)[1]
        for p in range(PARTITIONS)
    }
    c.close()
    return oracle, ends


def write_config(path: Path, bootstrap: str, prefix: str) -> Path:
    path.write_text(
        f'topic_prefix = "{prefix}"\n[kafka]\n"bootstrap.servers" = "{bootstrap}"\n'
        f'[[tables]]\nname = "{TABLE}"\ndim = {DIM}\npartitions = {PARTITIONS}\n'
    )
    return path


def start(side: str, config: Path, store: Path, log: Path) -> subprocess.Popen[bytes]:
    if side == "plain":
        cmd = [sys.executable, __file__, "--plain-child", str(config), str(store)]
    else:
        cmd = [
            sys.executable,
            "-m",
            "streamhps",
            "processor",
            "--config",
            str(config),
            "--store",
            str(store),
        ]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)


class Watch:
    """Polls a store from outside: the sum of its next offsets and its cumulative rows_in."""

    def __init__(self, store: Path) -> None:
        self.store = store
        self._st: LmdbStore | None = None

    def read(self) -> int:
        if self._st is None:
            if not (self.store / "data.mdb").exists():
                return 0
            self._st = LmdbStore.open(self.store, readonly=True)
        try:
            return sum(self._st.offsets().values())
        except StoreError:
            return 0

    def rows_in(self) -> int:
        assert self._st is not None
        return int(self._st.stats()["tables"][TABLE]["compaction"]["rows_in"])

    def until(
        self, cond: Any, proc: subprocess.Popen[bytes], timeout: float = 300
    ) -> tuple[float, int]:
        deadline = time.monotonic() + timeout
        while True:
            offs = self.read()
            now = time.monotonic()
            if cond(offs):
                return now, offs
            if proc.poll() is not None:
                raise RuntimeError(f"processor exited with {proc.returncode}")
            if now > deadline:
                raise TimeoutError(f"store {self.store} stuck at {offs} offsets")
            time.sleep(POLL_S)

    def close(self) -> None:
        if self._st is not None:
            self._st.close()


def stop(proc: subprocess.Popen[bytes]) -> int:
    return stop_process(proc, 30, name="processor")


def cpu_seconds(proc: subprocess.Popen[bytes]) -> float:
    """User + system CPU time of a running child so far (Linux /proc)."""
    fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def throughput(
    side: str, config: Path, store: Path, total: int, oracle: Oracle, log: Path
) -> dict[str, Any]:
    proc = start(side, config, store, log)
    w = Watch(store)
    try:
        t_first, _ = w.until(lambda o: o > 0, proc)
        cpu_first, rows_first = cpu_seconds(proc), w.rows_in()
        t_done, _ = w.until(lambda o: o >= total, proc)
        cpu_done, rows_done = cpu_seconds(proc), w.rows_in()
    finally:
        code = stop(proc)
        w.close()
    return {
        "rows_per_cpu_s": (rows_done - rows_first) / max(cpu_done - cpu_first, 1e-9),
        "rows_per_s": (rows_done - rows_first) / (t_done - t_first),
        "seconds": t_done - t_first,
        "rows": rows_done - rows_first,
        "exit_code": code,
        **oracle.check(store),
    }


def kill_resume(
    side: str, config: Path, store: Path, total: int, oracle: Oracle, log: Path
) -> dict[str, Any]:
    """Kill at each of KILL_AT that still leaves a backlog (one batch of up to
    ``batch_max_messages`` may take the rest), restart at once, time each resume."""
    w = Watch(store)
    t0 = time.monotonic()
    proc = start(side, config, store, log)
    resumes: list[float] = []
    try:
        for frac in KILL_AT:
            w.until(lambda o, f=frac: o >= f * total, proc)
            proc.kill()
            proc.wait()
            at_kill = w.read()
            t0 = time.monotonic()
            proc = start(side, config, store, log)
            if at_kill >= total:
                break  # nothing left to resume into
            t1, _ = w.until(lambda o, k=at_kill: o > k, proc)
            resumes.append(t1 - t0)
        if not resumes:
            raise RuntimeError(f"no kill of the {side} processor left a backlog; use more --rows")
        t_done, _ = w.until(lambda o: o >= total, proc)
        caught_up = t_done - t0
        time.sleep(1.5)  # SIGTERM only once the restarted process has its signal handlers
    finally:
        code = stop(proc)
        w.close()
    return {"resume_s": resumes, "caught_up_s": caught_up, "exit_code": code, **oracle.check(store)}


def plain_child(config: str, store: str) -> int:
    """Today's loop as ``streamhps processor`` ran it before faust hosted it."""
    import logging

    from streamhps.config import Config
    from streamhps.processor import Processor

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    proc = Processor(Config.load(config), store)
    signal.signal(signal.SIGTERM, lambda *_: proc.stop())
    signal.signal(signal.SIGINT, lambda *_: proc.stop())
    err: list[BaseException] = []

    def run() -> None:
        try:
            proc.run()
        except BaseException as e:  # noqa: BLE001 - reported by the exit code
            err.append(e)

    t = threading.Thread(target=run, name="processor")
    t.start()
    while t.is_alive():
        t.join(0.2)
    if err:
        raise err[0]
    return 0


def measure(
    args: argparse.Namespace, base: Path, sides: tuple[str, ...], runs: dict[str, Any]
) -> tuple[int, int]:
    """Publish, then run every round of both sides; returns (rows published, messages)."""
    prefix = f"pf{uuid.uuid4().hex[:8]}"
    with EmbeddedBroker(port=0, log_path=base / "tansu.log") as broker:
        t0 = time.monotonic()
        oracle, ends = publish(broker.bootstrap_servers, prefix, args.rows)
        total = sum(ends.values())
        print(
            f"published {oracle.rows:,} rows of dim {DIM} in {total} messages ({PARTITIONS} partitions) "
            f"in {time.monotonic() - t0:.1f} s; {os.cpu_count()} cpus"
        )
        config = write_config(base / "c.toml", broker.bootstrap_servers, prefix)
        for rep in range(args.repeat):
            for side in sides if rep % 2 == 0 else sides[::-1]:  # neither side always first
                log = base / f"{side}.log"
                r = throughput(side, config, base / f"tp-{side}-{rep}", total, oracle, log)
                runs[side]["throughput"].append(r)
                k = kill_resume(side, config, base / f"kill-{side}-{rep}", total, oracle, log)
                runs[side]["kill"].append(k)
                for store in (f"tp-{side}-{rep}", f"kill-{side}-{rep}"):  # ~0.4 GB each, checked
                    shutil.rmtree(base / store)
                print(
                    f"  round {rep} {side:>5}: {r['rows_per_s']:>10,.0f} rows/s "
                    f"({r['rows_per_cpu_s']:,.0f} per CPU-s); resume "
                    + ", ".join(f"{s:.2f}" for s in k["resume_s"])
                    + " s"
                )
    return oracle.rows, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_500_000, help="rows published (default 1.5M)")
    ap.add_argument("--repeat", type=int, default=4, help="rounds; each side once per round")
    ap.add_argument("--out", default="bench/results/processor_faust.json")
    ap.add_argument("--plain-child", nargs=2, metavar=("CONFIG", "STORE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.plain_child:
        sys.exit(plain_child(*args.plain_child))

    sides = ("plain", "faust")
    base = Path(tempfile.mkdtemp(prefix="bench-processor-faust-"))
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        s: {"throughput": [], "kill": []} for s in sides
    }
    try:
        oracle_rows, total = measure(args, base, sides, runs)
    finally:
        shutil.rmtree(base, ignore_errors=True)

    summary: dict[str, dict[str, Any]] = {}
    for side in sides:
        tp = runs[side]["throughput"]
        kills = runs[side]["kill"]
        resumes = [s for k in kills for s in k["resume_s"]]
        summary[side] = {
            "rows_per_s": max(r["rows_per_s"] for r in tp),
            "rows_per_s_median": statistics.median(r["rows_per_s"] for r in tp),
            "rows_per_cpu_s": max(r["rows_per_cpu_s"] for r in tp),
            "kills": len(resumes),
            "resume_median_s": statistics.median(resumes),
            "resume_max_s": max(resumes),
            "caught_up_median_s": statistics.median(k["caught_up_s"] for k in kills),
            "lost": sum(r["lost"] for r in tp + kills),
            "replayed": sum(r["replayed"] for r in tp + kills),
            "clean_exit": all(r["exit_code"] == 0 for r in tp + kills),
        }
    ratio = summary["faust"]["rows_per_s"] / summary["plain"]["rows_per_s"]
    ratio_median = summary["faust"]["rows_per_s_median"] / summary["plain"]["rows_per_s_median"]
    meets = (
        ratio >= 0.9
        and summary["faust"]["resume_max_s"] <= 2.0
        and summary["faust"]["lost"] == 0
        and summary["faust"]["replayed"] == 0
    )
    print(
        f"\n{'side':>6} {'rows/s into LMDB':>17} {'vs plain':>9} {'median rows/s':>14} "
        f"{'rows/CPU-s':>11} {'kills':>6} {'resume p50':>11} {'resume max':>11} "
        f"{'caught up':>10} {'lost':>5} {'replayed':>9} {'SIGTERM exit 0':>15}"
    )
    for side in sides:
        s = summary[side]
        print(
            f"{side:>6} {s['rows_per_s']:>17,.0f} {s['rows_per_s'] / summary['plain']['rows_per_s']:>8.1%} "
            f"{s['rows_per_s_median']:>14,.0f} {s['rows_per_cpu_s']:>11,.0f} {s['kills']:>6} "
            f"{s['resume_median_s']:>10.2f}s {s['resume_max_s']:>10.2f}s {s['caught_up_median_s']:>9.2f}s "
            f"{s['lost']:>5} {s['replayed']:>9} {str(s['clean_exit']):>15}"
        )
    print(
        f"criteria (faust >= 90 % of plain rows/s, resume <= 2 s, 0 lost, 0 replayed): "
        f"{'met' if meets else 'NOT met'} (best {ratio:.1%} of plain, median {ratio_median:.1%})"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                "rows": oracle_rows,
                "messages": total,
                "dim": DIM,
                "partitions": PARTITIONS,
                "key_space": KEY_SPACE,
                "kill_at": KILL_AT,
                "repeat": args.repeat,
                "summary": summary,
                "faust_vs_plain": ratio,
                "faust_vs_plain_median": ratio_median,
                "criteria_met": meets,
                "runs": runs,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
