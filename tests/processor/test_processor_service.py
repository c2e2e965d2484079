"""The faust worker that hosts the consumer loop: web views, shutdown, a loop that fails."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from streamhps.config import TableSpec
from streamhps.publish import Publisher
from streamhps.store import LmdbStore
from streamhps.testing import stop_processor, wait_for_applied_version

pytestmark = pytest.mark.integration
SPEC = TableSpec("user", dim=16, partitions=2)


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_two_shards_serve_metrics_on_loopback_and_stop_cleanly(
    bootstrap, prefix, tmp_path, run_processor, make_config
) -> None:
    cfg = make_config(tmp_path / "c.toml", bootstrap, prefix)
    with Publisher(bootstrap, [SPEC], prefix) as pub:
        pub.create_topics()
        keys = np.arange(500)
        pub.publish("user", keys, np.ones((500, 16), np.float32), version=3)
        pub.commit(3)
    log = tmp_path / "processor.log"
    procs = [run_processor(cfg, tmp_path / f"s{i}", shard=f"{i}/2") for i in range(2)]
    for i, proc in enumerate(procs):
        wait_for_applied_version(tmp_path / f"s{i}", "user", 3, proc=proc)
    urls = set(re.findall(r"metrics at (http://127\.0\.0\.1:\d+)/metrics", log.read_text()))
    assert len(urls) == 2, log.read_text()  # one free loopback port each, on one host
    for url in urls:
        status, text = _get(url + "/metrics")
        assert status == 200
        shard = re.search(r'streamhps_processor_rows_in_total\{shard="(\d)/2"\} (\d+)', text)
        assert shard is not None, text
        with LmdbStore.open(tmp_path / f"s{shard.group(1)}", readonly=True) as st:
            rows_in = st.stats()["tables"]["user"]["compaction"]["rows_in"]
        assert int(shard.group(2)) == rows_in > 0
        assert re.search(r'applied_version\{shard="\d/2",table="user"\} 3', text), text
        assert _get(url + "/healthz") == (200, "ok\n")
        assert _get(url + "/router/")[0] == 404  # faust's table views are off: no faust tables
    for proc in procs:
        assert stop_processor(proc) == 0  # SIGTERM: the worker stops the loop, exit 0
    assert log.read_text().count("processor stopped cleanly") == 2
    # faust's data directory is inside each store, never faust's default "<app id>-data" in the CWD
    assert (tmp_path / "s0" / "faust").is_dir() and (tmp_path / "s1" / "faust").is_dir()
    assert (tmp_path / "s0").stat().st_mode & 0o777 == 0o700  # the store stays private
    assert not list(Path.cwd().glob(f"{prefix}*"))


def test_a_loop_that_fails_stops_the_worker_with_its_error(
    bootstrap, prefix, tmp_path, make_config
) -> None:
    cfg = make_config(tmp_path / "c.toml", bootstrap, prefix, dim=16)
    store = tmp_path / "store"
    with LmdbStore.open(store, readonly=False) as st:  # a store written for another dim
        st.ensure_tables({"user": TableSpec("user", dim=8, partitions=2)})
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "streamhps", "processor", "--config", str(cfg), "--store", str(store)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr  # a config error, not a hang
    said = " ".join(done.stderr.split())  # rich wraps lines
    assert "dim=16" in said and "holds dim=8" in said and "use a new --store directory" in said
    assert time.monotonic() - started < 30


def test_a_taken_web_port_is_an_error_naming_it(bootstrap, prefix, tmp_path, make_config) -> None:
    cfg = make_config(tmp_path / "c.toml", bootstrap, prefix)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "streamhps", "processor", "--config", str(cfg),
             "--store", str(tmp_path / "store"), "--web-port", str(port)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    said = " ".join(done.stderr.split())
    assert done.returncode == 1, done.stdout + done.stderr
    assert "faust worker failed" in said and str(port) in said, said
