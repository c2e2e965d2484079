"""kill -9 of the inference server (its worker) again and again while a trainer publishes: every
restart serves nothing older than the store held when it started, nothing goes back while it
lives, and the last one serves every acknowledged row."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from streamhps import Config, Publisher
from streamhps.broker import free_port
from streamhps.client import InferenceClient
from streamhps.store import LmdbStore
from streamhps.testing import start_processor, stop_processor, wait_for_applied_version

pytestmark = [pytest.mark.integration, pytest.mark.slow]
KEYS = 2000
DIM = 8
CONFIG = """topic_prefix = "{prefix}"
[kafka]
"bootstrap.servers" = "{bootstrap}"
[[tables]]
name = "user"
dim = 8
partitions = 2
[serving]
max_staleness_s = 5.0
[processor]
batch_max_seconds = 0.02
"""


def _serve(cfg: Path, store: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "streamhps", "serve", "--config", str(cfg), "--store",
             str(store), "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip


def _served_versions(client: InferenceClient) -> np.ndarray:
    # every element of a row is its version (see the publisher below)
    return client.lookup("user", np.arange(KEYS))[:, 0].astype(np.int64)


def test_kill_storm_of_the_server_under_continuous_publishing(
    bootstrap: str, tmp_path: Path
) -> None:
    cfg_path = tmp_path / "c.toml"
    cfg_path.write_text(CONFIG.format(prefix=f"k{uuid.uuid4().hex[:10]}", bootstrap=bootstrap))
    cfg = Config.load(cfg_path)
    store = tmp_path / "store"
    acked = np.zeros(KEYS, np.int64)  # the oracle: latest acknowledged version per key
    with Publisher.from_config(cfg) as pub:
        pub.create_topics()
        pub.publish("user", np.arange(KEYS), np.ones((KEYS, DIM), np.float32), version=1)
        pub.commit(1)
    acked[:] = 1
    proc = start_processor(cfg_path, store, log_path=tmp_path / "processor.log")
    stop = threading.Event()
    errors: list[BaseException] = []

    def publish() -> None:
        rng = np.random.default_rng(3)
        try:
            with Publisher.from_config(cfg) as pub:
                while not stop.is_set():
                    v = (pub.committed_version("user") or 0) + 1  # resumes above version 1
                    keys = rng.choice(KEYS, size=200, replace=False)
                    pub.publish("user", keys, np.full((200, DIM), v, np.float32), version=v)
                    pub.commit(v)
                    acked[keys] = v
                    time.sleep(0.02)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=publish)
    server: subprocess.Popen[bytes] | None = None
    try:
        wait_for_applied_version(store, "user", 1, timeout=60, proc=proc)
        t.start()
        for _ in range(4):
            with LmdbStore.open(store, readonly=True) as st:
                _, at_start, _ = st.get("user", np.arange(KEYS))
            port = free_port()
            server = _serve(cfg_path, store, port, tmp_path / "server.log")
            client = InferenceClient(f"http://127.0.0.1:{port}", timeout=30)
            client.wait_ready(45)
            seen = _served_versions(client)
            assert (seen >= at_start).all(), "a restarted worker served rows older than the store"
            for _ in range(3):
                now = _served_versions(client)
                assert (now >= seen).all(), "a served version went back"
                seen = now
            server.send_signal(signal.SIGKILL)  # mid-ingest, mid-publish
            server.wait(30)
            server = None
        stop.set()
        t.join(60)
        assert not errors, errors
        port = free_port()
        server = _serve(cfg_path, store, port, tmp_path / "server.log")
        client = InferenceClient(f"http://127.0.0.1:{port}", timeout=30)
        client.wait_ready(45)
        deadline = time.monotonic() + 45
        served = _served_versions(client)
        while not np.array_equal(served, acked) and time.monotonic() < deadline:
            time.sleep(0.2)
            served = _served_versions(client)
        np.testing.assert_array_equal(served, acked)  # nothing acknowledged was lost
        assert acked.max() > 4
    finally:
        stop.set()
        if t.is_alive():
            t.join(60)
        if server is not None and server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(15)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        stop_processor(proc)
