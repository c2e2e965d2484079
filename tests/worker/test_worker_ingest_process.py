"""A cpu worker whose ingest runs in a process of its own (``serving.ingest = "process"``): lookups
served here from the cache both processes map, and the faults an operator meets with it.

The worker's behaviour (freshness, the miss path and invariant 3, bounded reads when the broker
goes away, dense models) is tested for both modes in ``test_worker_integration.py``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from confluent_kafka import KafkaException

from streamhps import Config
from streamhps.errors import ConfigError, StaleReadError, StreamHPSError
from streamhps.worker import InferenceWorker, core, write_relay

from .conftest import empty_store, table_rows

pytestmark = pytest.mark.integration


def _wait(cond, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by its parent) counts as gone
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


def test_the_stream_is_consumed_in_another_process_and_served_here(
    worker_env, tmp_path: Path
) -> None:
    _, cfg, pub = worker_env(serving={"ingest": "process"})
    store = empty_store(cfg, tmp_path / "store")
    keys = np.arange(4000, dtype=np.int64) * 13
    pub.publish("user", keys, table_rows(keys, 1), 1)
    pub.commit(1)
    with InferenceWorker(cfg, store) as w:  # the mode from the config
        assert w.ingest_mode == "process"
        w.wait_ready(30)
        pid = w.stats()["ingest_process"]["pid"]
        assert pid != os.getpid() and _alive(pid)
        # nothing of the ingest runs in this interpreter: no fetch or apply thread, no consumer
        names = {t.name for t in threading.enumerate()}
        assert not names & {"streamhps-ingest", "streamhps-fetch"}, names
        assert w._consumer is None and w._ingest is None
        assert (w.lookup("user", keys, consistency="bounded")[:, 0] == 1).all()
        pub.publish("user", keys, table_rows(keys, 2), 2)
        pub.commit(2)
        _wait(lambda: bool((w.lookup("user", keys)[:, 0] == 2).all()), 2.0, "version 2 here")
        s = w.stats()
        # the other process wrote the rows; this one looked them up in the same table
        assert s["ingest"]["rows"] >= 2 * keys.shape[0]
        assert s["lookups"]["hits"] >= 2 * keys.shape[0] and s["lookups"]["misses"] == 0
        assert s["tables"]["user"]["cache"]["size"] == keys.shape[0]
        lat, rows = w.visible_latencies()
        assert rows.sum() >= 2 * keys.shape[0] and (lat > 0).all()
    _wait(lambda: not _alive(pid), 5.0, "the ingest process to exit after stop()")


def test_ingest_process_killed_turns_the_worker_not_ready_and_eventual_reads_keep_serving(
    worker_env, tmp_path: Path
) -> None:
    _, cfg, pub = worker_env()
    store = empty_store(cfg, tmp_path / "store")
    keys = np.arange(500, dtype=np.int64)
    pub.publish("user", keys, table_rows(keys, 1), 1)
    pub.commit(1)
    w = InferenceWorker(cfg, store, ingest="process").start()
    try:
        w.wait_ready(30)
        pid = w.stats()["ingest_process"]["pid"]
        os.kill(pid, signal.SIGKILL)
        _wait(lambda: not w.ready(), 5.0, "the worker to turn not-ready")
        assert "exited with signal 9" in (w.not_ready_reason() or "")
        with pytest.raises(StaleReadError, match="ingest stopped: .* exited with signal 9"):
            w.lookup("user", keys, consistency="bounded")
        # the cache stays mapped here: what it holds is still served
        assert (w.lookup("user", keys)[:, 0] == 1).all()
        with pytest.raises(Exception, match="exited with signal 9"):
            w.staleness()
    finally:
        t0 = time.monotonic()
        w.stop()
        assert time.monotonic() - t0 < 5


def test_ingest_process_exits_when_the_serving_process_dies(worker_env, tmp_path: Path) -> None:
    path, cfg, pub = worker_env()
    store = empty_store(cfg, tmp_path / "store")
    script = textwrap.dedent(
        f"""
        import sys, time
        from streamhps.worker import InferenceWorker, core, write_relay
        w = InferenceWorker.from_config({str(path)!r}, {str(store)!r}, ingest="process").start()
        print(w.stats()["ingest_process"]["pid"], flush=True)
        time.sleep(60)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        line = parent.stdout.readline()
        assert line.strip().isdigit(), f"the serving process printed {line!r}"
        child = int(line)
        assert _alive(child)
        parent.kill()  # no stop(): the child must notice by itself
        parent.wait()
        _wait(lambda: not _alive(child), 10.0, "the orphaned ingest process to exit")
    finally:
        if parent.poll() is None:
            parent.kill()


def test_ingest_mode_is_checked(
    worker_env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, cfg, _ = worker_env()
    store = empty_store(cfg, tmp_path / "store")
    # a cuda worker may ingest in a process too (its writes relayed, streamhps.worker.write_relay)
    assert InferenceWorker(cfg, store, device="cuda", ingest="process").ingest_mode == "process"
    with pytest.raises(ConfigError, match="ingest must be one of"):
        InferenceWorker(cfg, store, ingest="fork")
    # the default: a worker with the cores for it ingests in a process of its own
    assert cfg.serving.ingest == "auto"
    cores = len(os.sched_getaffinity(0))
    expected = "process" if cores >= core.INGEST_PROCESS_MIN_CORES else "thread"
    assert InferenceWorker(cfg, store).ingest_mode == expected
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert InferenceWorker(cfg, store).ingest_mode == "process"
    assert InferenceWorker(cfg, store, device="cuda").ingest_mode == "process"
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert InferenceWorker(cfg, store).ingest_mode == "thread"
    assert InferenceWorker(cfg, store, device="cuda").ingest_mode == "thread"
    with pytest.raises(ConfigError, match="serving.ingest must be 'auto', 'thread' or 'process'"):
        Config.from_dict(
            {"tables": [{"name": "t", "dim": 4, "partitions": 1}], "serving": {"ingest": "procs"}}
        )


def test_an_ingest_process_that_dies_while_starting_fails_start_and_leaves_nothing(
    worker_env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A child that exits before its worker started (here: an interpreter that exits at once)
    fails ``start()`` at once, saying so; nothing is left running."""
    _, cfg, _ = worker_env()
    store = empty_store(cfg, tmp_path / "store")
    w = InferenceWorker(cfg, store, ingest="process")
    before = {t.name for t in threading.enumerate()}
    monkeypatch.setattr(sys, "executable", "/bin/false")
    t0 = time.monotonic()
    with pytest.raises(StreamHPSError, match="exited with code 1 while starting its worker"):
        w.start()
    assert time.monotonic() - t0 < 10
    assert not w.ready() and w.not_ready_reason() == "not started"
    time.sleep(0.2)
    assert {t.name for t in threading.enumerate()} <= before
    assert w._remote is not None and not w._remote.alive()


def test_a_kafka_setting_the_client_refuses_is_raised_as_in_thread_mode(
    worker_env, tmp_path: Path
) -> None:
    _, cfg, _ = worker_env()
    store = empty_store(cfg, tmp_path / "store")
    w = InferenceWorker(cfg, store, ingest="process", kafka_config={"no.such.setting": 1})
    with pytest.raises(KafkaException, match="no.such.setting"):
        w.start()
    assert w._remote is None  # refused before a child was started


def test_the_child_imports_the_streamhps_of_its_parent(worker_env, tmp_path: Path) -> None:
    """A serving process that found streamhps through a path put on ``sys.path`` at run time (a
    checkout, not the install) starts an ingest process that runs the same code: the child is
    told where the package lives. The copy's child entry point leaves a mark when it runs."""
    import shutil

    import streamhps

    path, cfg, pub = worker_env()
    store = empty_store(cfg, tmp_path / "store")
    keys = np.arange(100, dtype=np.int64)
    pub.publish("user", keys, table_rows(keys, 1), 1)
    pub.commit(1)
    checkout, mark = tmp_path / "checkout", tmp_path / "child-ran-the-checkout"
    shutil.copytree(
        Path(streamhps.__file__).parent, checkout / "streamhps",
        ignore=shutil.ignore_patterns("__pycache__"),
    )  # fmt: skip
    entry = checkout / "streamhps" / "worker" / "ingest_process.py"
    code = entry.read_text()
    future = "from __future__ import annotations\n"
    entry.write_text(
        code.replace(
            future,
            future + f"if __name__ == '__main__': open({str(mark)!r}, 'w').write(__file__)\n",
            1,
        )
    )
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(checkout)!r})
        import streamhps
        assert streamhps.__file__.startswith({str(checkout)!r}), streamhps.__file__
        from streamhps.worker import InferenceWorker, core, write_relay
        with InferenceWorker.from_config({str(path)!r}, {str(store)!r}, ingest="process") as w:
            w.wait_ready(30)
            print(int(w.lookup("user", list(range(100)))[:, 0].min()), flush=True)
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "1"
    assert mark.read_text().startswith(str(checkout))


def test_misses_of_many_serving_threads_at_once_get_their_own_rows(
    worker_env, tmp_path: Path
) -> None:
    """Eight threads look up keys the cache does not hold (consumed, in the child's window, not
    in LMDB: no processor runs) at the same time, over the connections to the child: each gets
    the rows of its own keys, and the fills they send make the keys resident."""
    _, cfg, pub = worker_env(table={"insert_on_update": False}, serving={"warm_from_store": False})
    store = empty_store(cfg, tmp_path / "store")
    keys = np.arange(8 * 500, dtype=np.int64) * 3  # well inside the cache: no bucket overflows
    pub.publish("user", keys, table_rows(keys, 5), 5)
    pub.commit(5)
    with InferenceWorker(cfg, store, ingest="process") as w:
        w.wait_ready(30)
        _wait(lambda: w.stats()["tables"]["user"]["window_rows"] == keys.size, 10.0, "the rows")
        errors: list[BaseException] = []

        def reader(part: np.ndarray) -> None:
            try:
                for chunk in np.array_split(part, 10):
                    got = w.lookup("user", chunk)
                    assert (got[:, 0] == 5).all() and (got[:, 1] == chunk % 1000).all()
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=reader, args=(p,)) for p in np.array_split(keys, 8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors[0]
        s = w.stats()
        assert s["lookups"]["from_window"] == keys.size and s["lookups"]["from_store"] == 0
        _wait(lambda: w.stats()["tables"]["user"]["cache"]["size"] == keys.size, 5.0, "fills")
        assert (w.lookup("user", keys)[:, 0] == 5).all()
        assert w.stats()["lookups"]["misses"] == keys.size  # the last lookup hit every key


def test_the_child_entry_point_run_by_hand_says_what_it_is() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "streamhps.worker.ingest_process"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 2
    assert "started by an InferenceWorker" in run.stderr and "streamhps serve" in run.stderr


def test_relayed_writes_larger_than_a_slot_arrive_whole_in_the_serving_process_cache(
    worker_env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The relay a cuda worker's ingest process writes its GPU cache through, on a numpy cache:
    slots of 4 KiB here (85 rows of dim 8), so every message and the warm-up are cut into
    pieces; every piece lands, in order (version 2 over version 1), and the serving process's
    cache is the one counted."""
    monkeypatch.setattr(InferenceWorker, "_relays_writes", lambda self: True)
    monkeypatch.setattr(write_relay, "SLOT_BYTES", 4096)
    _, cfg, pub = worker_env()
    store = empty_store(cfg, tmp_path / "store")
    keys = np.arange(3000, dtype=np.int64) * 7
    pub.publish("user", keys, table_rows(keys, 1), 1)
    pub.commit(1)
    with InferenceWorker(cfg, store, ingest="process") as w:
        w.wait_ready(30)
        assert w._remote is not None and w._remote.shared.relay.nbytes == 2 * 4096
        assert (w.lookup("user", keys, consistency="bounded")[:, 0] == 1).all()
        pub.publish("user", keys, table_rows(keys, 2), 2)
        pub.commit(2)
        _wait(lambda: bool((w.lookup("user", keys)[:, 0] == 2).all()), 5.0, "version 2 here")
        np.testing.assert_array_equal(w.lookup("user", keys), table_rows(keys, 2))
        s = w.stats()
        relay = s["ingest_process"]["relay"]
        assert relay["rows"] >= 2 * keys.size and relay["writes"] >= 2 * keys.size // 85
        assert s["tables"]["user"]["cache"]["size"] == keys.size  # this process's cache
        assert s["lookups"]["misses"] == 0
