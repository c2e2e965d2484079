"""Fixtures of the serving tests: a real broker, processor, LMDB store, worker and HTTP server."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from servers.app import InferenceServer
from streamhps import Config, Publisher
from streamhps.client import InferenceClient
from streamhps.testing import start_processor, stop_processor, wait_for_applied_version
from streamhps.worker import InferenceWorker

CONFIG = """\
topic_prefix = "{prefix}"
[kafka]
"bootstrap.servers" = "{bootstrap}"
[[tables]]
name = "user"
dim = 8
partitions = 2
missing = "error"
[[tables]]
name = "item"
dim = 8
partitions = 2
missing = "zeros"
[serving]
max_staleness_s = 5.0
max_lookup_keys = 10000
"""


@dataclass
class Deployment:
    config: Config
    config_path: Path
    store: Path
    publisher: Publisher
    worker: InferenceWorker
    server: InferenceServer
    client: InferenceClient
    rows: dict[str, tuple[np.ndarray, np.ndarray]]  # table -> (keys, vectors) at version 1


@pytest.fixture(scope="module")
def deployment(bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    tmp = tmp_path_factory.mktemp("serving")
    cfg_path = tmp / "streamhps.toml"
    cfg_path.write_text(CONFIG.format(prefix=f"s{uuid.uuid4().hex[:10]}", bootstrap=bootstrap))
    cfg = Config.load(cfg_path)
    rng = np.random.default_rng(7)
    rows = {
        "user": (
            np.arange(1000, 1600, dtype=np.int64),
            rng.standard_normal((600, 8)).astype(np.float32),
        ),
        "item": (
            np.arange(0, 300, dtype=np.int64) * 7919,
            rng.standard_normal((300, 8)).astype(np.float32),
        ),
    }
    pub = Publisher.from_config(cfg)
    pub.create_topics()
    for table, (k, v) in rows.items():
        pub.publish(table, k, v, version=1)
    pub.commit(1)
    store = tmp / "store"
    proc = start_processor(cfg_path, store, log_path=tmp / "processor.log")
    worker = None
    server = None
    try:
        for table in rows:
            wait_for_applied_version(store, table, 1, timeout=60, proc=proc)
        worker = InferenceWorker.from_config(cfg, store=store, device="cpu").start()
        worker.wait_ready(30)
        server = InferenceServer(worker, cfg, port=0, sample_interval=0.25).start()
        client = InferenceClient(server.url)
        client.wait_ready(30)
        yield Deployment(cfg, cfg_path, store, pub, worker, server, client, rows)
    finally:
        if server is not None:
            server.stop()
        if worker is not None:
            worker.stop()
        stop_processor(proc)
        pub.close()
