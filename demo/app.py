"""``streamhps demo``: the whole system on one machine, with the numbers that justify it.

Starts the embedded broker, creates the topics, starts the processor and the inference server
as child processes, trains the DLRM online in this process, and sends prediction traffic drawn
from the same (drifting) world through :class:`~streamhps.client.InferenceClient`. Beside the
served predictions it scores a *frozen* copy of the model, taken at the first commit and never
updated, on the same traffic: the online AUC staying above the frozen one is the reason the
system exists. Ends with a summary (also written as JSON with ``--summary-json``) and stops
every process it started, on normal exit, on Ctrl-C and on SIGTERM.

The live view and the summary table are in :mod:`demo.view`; the command in :mod:`demo.cli`.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from demo.view import live_view, quantile, to_ms
from streamhps.processes import stop_process

log = logging.getLogger(__name__)

CONFIG_TEMPLATE = """\
topic_prefix = "demo"
[kafka]
"bootstrap.servers" = "{bootstrap}"
[[tables]]
name = "user"
dim = {dim}
partitions = {partitions}
missing = "zeros"
[[tables]]
name = "item"
dim = {dim}
partitions = {partitions}
missing = "zeros"
[serving]
max_staleness_s = {max_staleness_s}
cache_capacity = {cache_capacity}
[processor]
# a throwaway store: commits without fsync (an OS crash can lose or corrupt it; see
# streamhps.store.lmdb_store for what each durability knob risks)
lmdb_sync = false
"""


@dataclass
class DemoOptions:
    duration: float = 180.0
    seed: int = 0
    warmup_steps: int = 1500
    steps_per_second: float = 100.0
    publish_every: int = 20
    traffic_batch: int = 512
    traffic_interval: float = 0.25
    dim: int = 16
    partitions: int = 2
    max_staleness_s: float = 2.0
    cache_capacity: int = 4096  # rows per table: below the id count, so the LMDB tier is used
    device: str = "cpu"
    port: int = 0
    workdir: str | None = None
    keep_workdir: bool = False
    live: bool = True
    summary_json: str | None = None


@dataclass
class _Window:
    t0: float
    labels: list[np.ndarray] = field(default_factory=list)
    online: list[np.ndarray] = field(default_factory=list)
    frozen: list[np.ndarray] = field(default_factory=list)
    oracle: list[np.ndarray] = field(default_factory=list)


class _Children:
    """Processes the demo started; ``stop_all`` ends each by its own id (process group)."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.broker: Any = None

    def add(self, name: str, proc: subprocess.Popen[bytes]) -> None:
        self.procs.append((name, proc))

    def stop_all(self) -> None:
        for name, proc in reversed(self.procs):
            stop_process(proc, 10, group=True, name=name)
        self.procs.clear()
        if self.broker is not None:
            self.broker.stop()
            self.broker = None

    def check(self) -> None:
        from streamhps.errors import StreamHPSError

        for name, proc in self.procs:
            if proc.poll() is not None:
                raise StreamHPSError(f"the {name} exited with code {proc.returncode}; see its log")


def _spawn(args: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    out: IO[bytes] = open(log_path, "ab")  # noqa: SIM115 - the child holds it
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "streamhps", *args], stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: stopped as a unit, Ctrl-C handled by us
        )  # fmt: skip
    finally:
        out.close()


def run_demo(opts: DemoOptions, console: Any = None) -> dict[str, Any]:
    """Run the demo; return the summary dict. Raises on failure after cleaning up."""
    from rich.console import Console

    from streamhps.broker import EmbeddedBroker, free_port
    from streamhps.client import InferenceClient
    from streamhps.config import Config
    from streamhps.errors import ServerError, StreamHPSError
    from streamhps.testing import wait_for_applied_version
    from streamhps.topics import ensure_topics, planned_topics
    from trainers.dlrm import OnlineTrainer
    from trainers.synthetic import StreamSpec, auc

    console = console or Console()
    workdir = Path(opts.workdir or tempfile.mkdtemp(prefix="streamhps-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    store = workdir / "store"
    children = _Children()
    stop = threading.Event()
    trainer: OnlineTrainer | None = None
    train_thread: threading.Thread | None = None
    train_error: list[BaseException] = []
    t_start = time.monotonic()
    phase = {"name": "starting"}

    def say(msg: str) -> None:
        phase["name"] = msg
        console.print(f"[dim]{time.monotonic() - t_start:6.1f}s[/] {msg}")

    try:
        broker = EmbeddedBroker(port=0, log_path=workdir / "broker.log").start()
        children.broker = broker
        say(f"embedded broker on {broker.bootstrap_servers}")
        cfg_path = workdir / "demo.toml"
        cfg_path.write_text(
            CONFIG_TEMPLATE.format(
                bootstrap=broker.bootstrap_servers, dim=opts.dim, partitions=opts.partitions,
                max_staleness_s=opts.max_staleness_s, cache_capacity=opts.cache_capacity,
            )
        )  # fmt: skip
        cfg = Config.load(cfg_path)
        created = ensure_topics(cfg.kafka, planned_topics(cfg.topic_prefix, cfg.tables))
        say(f"created {len(created)} topics")
        children.add(
            "processor",
            _spawn(
                ["processor", "--config", str(cfg_path), "--store", str(store)],
                workdir / "processor.log",
            ),
        )
        say("processor started")

        trainer = OnlineTrainer(
            cfg, stream=StreamSpec(seed=opts.seed), publish_every=opts.publish_every,
        ).__enter__()  # fmt: skip
        say(f"trainer warm-up: {opts.warmup_steps} steps before the first commit")
        for _ in range(opts.warmup_steps):
            trainer.step()
        first_version = trainer.publish()
        frozen = trainer.snapshot()  # the model as deployed once, never updated again
        say(
            f"first commit: version {first_version}, {trainer.stats.rows_published} rows; frozen copy taken"
        )
        for t in cfg.tables:
            wait_for_applied_version(store, t.name, first_version, timeout=60)
        say("processor applied the first version to LMDB")

        port = opts.port or free_port()
        children.add(
            "inference server",
            _spawn(["serve", "--config", str(cfg_path), "--store", str(store), "--port", str(port),
                    "--device", opts.device], workdir / "server.log"),
        )  # fmt: skip
        client = InferenceClient(f"http://127.0.0.1:{port}", timeout=10)
        deadline = time.monotonic() + 60
        while True:
            children.check()
            try:
                client.wait_ready(timeout=1)
                if client.status().get("dense_model"):
                    break
            except ServerError:
                pass
            if time.monotonic() > deadline:
                raise StreamHPSError(
                    f"inference server not ready after 60s; see {workdir / 'server.log'}"
                )
        say(f"inference server ready on {client.url} (status page: {client.url}/)")

        def train() -> None:
            assert trainer is not None
            try:
                trainer.run(stop=stop, steps_per_second=opts.steps_per_second)
            except BaseException as e:  # noqa: BLE001 - reported by the main thread
                train_error.append(e)
                stop.set()

        rows_at_server_start = trainer.stats.rows_published  # the server reads these from LMDB
        train_thread = threading.Thread(target=train, name="demo-trainer", daemon=True)
        train_thread.start()

        summary = _traffic_loop(
            opts, console, trainer, frozen, client, children, stop, train_error, auc
        )
        stop.set()
        train_thread.join(30)
        if train_error:
            raise train_error[0]
        # Let the serving side catch up with the last commit and the last dense update (published
        # after the commit, on its own topic: it may arrive after the tables' markers), then
        # read the final state.
        last = trainer.stats.last_version
        deadline = time.monotonic() + 15
        applied: dict[str, int] = {}
        while time.monotonic() < deadline:
            status = client.status()
            applied = _applied_versions(status)
            dense = (status.get("dense_model") or {}).get("version") or 0
            if applied and min(applied.values()) >= last and dense >= trainer.stats.dense_version:
                break
            time.sleep(0.2)
        final_status = client.status()
        s = trainer.stats
        applied_min = min(applied.values()) if applied else 0
        # publish -> visible to lookups over the rows the server consumed (schemas/README.md)
        visible = (final_status.get("worker") or {}).get("apply_latency_ms") or {}
        summary.update(
            rows_visible_ms_p50=visible.get("p50"),
            rows_visible_ms_p99=visible.get("p99"),
            rows_visible_ms_max=visible.get("max"),
            rows_visible_counted=visible.get("rows", 0),
            rows_published_at_server_start=rows_at_server_start,
            commit_interval_s=opts.publish_every / opts.steps_per_second,
            max_staleness_s=opts.max_staleness_s,
            rows_published=s.rows_published,
            commits=s.commits,
            last_committed_version=last,
            applied_version=applied_min,
            applied_versions_by_table=applied,
            versions_applied=sum(1 for h in s.history if h["step"] <= applied_min),
            dense_updates_published=s.dense_published,
            dense_version_served=(final_status.get("dense_model") or {}).get("version"),
            trainer_steps=s.step,
            trainer_examples=s.samples,
            frozen_version=frozen.version,
            duration_s=round(time.monotonic() - t_start, 1),
            workdir=str(workdir),
        )
        return summary
    finally:
        stop.set()
        if train_thread is not None:
            # Ctrl-C inside start() leaves a thread that never started: nothing to wait for
            with contextlib.suppress(RuntimeError):
                train_thread.join(10)
        if trainer is not None:
            try:
                trainer.close()
            except StreamHPSError as e:
                log.warning("trainer close: %s", e)
        children.stop_all()
        if not opts.keep_workdir and opts.workdir is None:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)


def _applied_versions(status: dict[str, Any]) -> dict[str, int]:
    out = {}
    for table, parts in (status.get("staleness") or {}).items():
        vs = [p.get("applied_version") or 0 for p in parts.values()]
        out[table] = int(min(vs)) if vs else 0
    return out


def _traffic_loop(
    opts: DemoOptions, console: Any, trainer: Any, frozen: Any, client: Any,
    children: _Children, stop: threading.Event, train_error: list[BaseException], auc: Any,
) -> dict[str, Any]:  # fmt: skip
    from rich.live import Live

    from streamhps.errors import ServerError

    rng = np.random.default_rng(opts.seed + 1000)  # traffic: same world, other draws
    world = trainer.stream
    t0 = time.monotonic()
    end = t0 + opts.duration
    window_s = max(2.0, opts.duration / 12)
    windows: list[_Window] = [_Window(0.0)]
    results: list[dict[str, Any]] = []
    staleness: list[float] = []
    hit: list[float] = []
    ingest: list[float] = []
    latencies: list[float] = []
    errors: dict[str, int] = {}
    state: dict[str, Any] = {"last_sample": {}, "applied": {}, "served": 0, "url": client.url}
    next_poll = t0

    def close_window(w: _Window) -> None:
        if not w.labels:
            return
        y = np.concatenate(w.labels)
        results.append({
            "t_s": round(w.t0, 1), "examples": int(y.size),
            "auc_online": auc(y, np.concatenate(w.online)),
            "auc_frozen": auc(y, np.concatenate(w.frozen)),
            "auc_oracle": auc(y, np.concatenate(w.oracle)),
        })  # fmt: skip

    def view() -> Any:
        return live_view(
            opts,
            time.monotonic() - t0,
            trainer,
            state,
            results,
            staleness,
            hit,
            ingest,
            latencies,
            errors,
        )

    with Live(
        view(),
        console=console,
        refresh_per_second=2,
        transient=False,
        auto_refresh=opts.live,
        vertical_overflow="visible",
    ) as live:
        while time.monotonic() < end and not stop.is_set():
            children.check()
            now = time.monotonic()
            b = world.sample(trainer.stats.step, opts.traffic_batch, rng)
            feats = {"user": b.users, "item": b.items}
            try:
                q0 = time.perf_counter()
                served = client.predict(feats, b.dense)
                latencies.append(time.perf_counter() - q0)
                state["served"] += int(served.size)
                w = windows[-1]
                w.labels.append(b.labels)
                w.online.append(served)
                w.frozen.append(frozen.predict(feats, b.dense))
                w.oracle.append(b.p_true)
            except ServerError as e:
                kind = e.kind or "ServerError"
                errors[kind] = errors.get(kind, 0) + 1
                log.warning("predict failed: %s", e)
            if now - t0 - windows[-1].t0 >= window_s:
                close_window(windows[-1])
                windows.append(_Window(now - t0))
            if now >= next_poll:
                next_poll = now + 1.0
                try:
                    hist = client.history(seconds=3)
                    sample = hist["samples"][-1] if hist.get("samples") else {}
                    state["last_sample"] = sample
                    state["ready"] = hist.get("ready")
                    stale = list((sample.get("staleness_s") or {}).values())
                    if stale and all(v is not None for v in stale):  # None: not caught up yet
                        staleness.append(float(max(stale)))
                    hr = [v for v in (sample.get("hit_ratio") or {}).values() if v is not None]
                    if hr:
                        hit.append(float(np.mean(hr)))
                    rates = [
                        v for v in (sample.get("ingest_rows_per_s") or {}).values() if v is not None
                    ]
                    if rates:
                        ingest.append(float(sum(rates)))
                    state["applied"] = sample.get("applied_version") or {}
                    state["visible_ms"] = sample.get("visible_ms")
                except ServerError as e:
                    log.warning("status poll failed: %s", e)
                if not opts.live:
                    live.update(view(), refresh=False)
            if opts.live:
                live.update(view())
            time.sleep(max(0.0, opts.traffic_interval - (time.monotonic() - now)))
        close_window(windows[-1])
        live.update(view(), refresh=True)

    def mean(key: str, rows: list[dict[str, Any]]) -> float | None:
        vals = [r[key] for r in rows if r[key] == r[key]]
        return float(np.mean(vals)) if vals else None

    late = results[len(results) // 2 :]
    return {
        "predictions_served": state["served"],
        "predict_errors": errors,
        "predict_latency_ms_p50": to_ms(quantile(latencies, 0.5)),
        "predict_latency_ms_p99": to_ms(quantile(latencies, 0.99)),
        "staleness_s_p50": quantile(staleness, 0.5),
        "staleness_s_p99": quantile(staleness, 0.99),
        "staleness_s_max": max(staleness) if staleness else None,
        "cache_hit_ratio": hit[-1] if hit else None,
        "ingest_rows_per_s_mean": float(np.mean(ingest)) if ingest else None,
        "auc_online_mean": mean("auc_online", results),
        "auc_frozen_mean": mean("auc_frozen", results),
        "auc_oracle_mean": mean("auc_oracle", results),
        "auc_online_late": mean("auc_online", late),
        "auc_frozen_late": mean("auc_frozen", late),
        "auc_windows": results,
    }
