"""Past the staleness bound the server says so: /readyz 503 with the reason, bounded reads 503."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from servers.app import InferenceServer
from streamhps import Config, Publisher, StaleReadError
from streamhps.broker import EmbeddedBroker
from streamhps.client import InferenceClient
from streamhps.testing import start_processor, stop_processor, wait_for_applied_version
from streamhps.worker import InferenceWorker

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_server_turns_not_ready_when_the_stream_is_lost(
    restartable_broker: EmbeddedBroker, tmp_path: Path
) -> None:
    cfg_path = tmp_path / "c.toml"
    cfg_path.write_text(
        f'topic_prefix = "s{uuid.uuid4().hex[:8]}"\n[kafka]\n'
        f'"bootstrap.servers" = "{restartable_broker.bootstrap_servers}"\n'
        '[[tables]]\nname = "user"\ndim = 4\n[serving]\nmax_staleness_s = 1.0\n'
    )
    cfg = Config.load(cfg_path)
    keys = np.arange(100, dtype=np.int64)
    vecs = np.random.default_rng(0).standard_normal((100, 4)).astype(np.float32)
    with Publisher.from_config(cfg) as pub:
        pub.create_topics()
        pub.publish("user", keys, vecs, version=1)
        pub.commit(1)
    proc = start_processor(cfg_path, tmp_path / "store", log_path=tmp_path / "p.log")
    try:
        wait_for_applied_version(tmp_path / "store", "user", 1, timeout=60, proc=proc)
        worker = InferenceWorker.from_config(cfg, store=tmp_path / "store").start()
        try:
            worker.wait_ready(30)
            with InferenceServer(worker, cfg, port=0) as server:
                client = InferenceClient(server.url)
                client.wait_ready(10)
                np.testing.assert_array_equal(
                    client.lookup("user", keys, consistency="bounded"), vecs
                )
                restartable_broker.kill()  # the stream is gone: freshness can no longer be known
                deadline = time.monotonic() + 15
                while client.ready()[0]:
                    assert time.monotonic() < deadline, "server stayed ready with no broker"
                    time.sleep(0.1)
                ok, reason = client.ready()
                assert (
                    not ok
                    and reason
                    and "behind the head" in reason
                    and "max_staleness_s" in reason
                )
                st = client.status()
                assert st["ready"] is False and st["reason"]
                with pytest.raises(StaleReadError, match="refused") as e:
                    client.lookup("user", keys[:5], consistency="bounded")
                assert e.value.status == 503
                # eventual reads still answer from the cache: the caller chose to accept staleness
                np.testing.assert_array_equal(client.lookup("user", keys[:5]), vecs[:5])
                metrics = client.metrics()
                assert "streamhps_ready 0" in metrics
                assert client.history(seconds=30)["ready"] is False
        finally:
            worker.stop()
    finally:
        stop_processor(proc, timeout=5)
