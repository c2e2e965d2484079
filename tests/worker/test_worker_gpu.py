"""The worker with the CUDA cache (skipped without a GPU)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from streamhps.errors import StaleReadError
from streamhps.worker import InferenceWorker

from .conftest import empty_store, table_rows

pytestmark = [pytest.mark.gpu, pytest.mark.integration]


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_cuda_worker_serves_stream_and_store(worker_env, tmp_path: Path, mode: str) -> None:
    """Both ingest modes: on threads beside the lookups, or in a process of its own that
    relays its cache writes to this process's GPU cache (streamhps.worker.write_relay)."""
    import cupy

    _, cfg, pub = worker_env(table={"insert_on_update": False}, serving={"warm_from_store": False})
    store = empty_store(cfg, tmp_path / "store")
    keys = np.arange(20000, dtype=np.int64) * 3
    pub.publish("user", keys, table_rows(keys, 1), 1)
    pub.commit(1)
    with InferenceWorker(cfg, store, device="cuda", ingest=mode) as w:
        w.wait_ready(60)
        if mode == "process":
            assert w._ingest is None and w._remote is not None
            assert w._remote.relay is not None and w._remote.relay._registered  # page-locked
        got = w.lookup("user", keys)  # cold: from the window, then filled into the GPU cache
        assert isinstance(got, np.ndarray) and (got[:, 0] == 1).all()
        deadline = time.monotonic() + 5
        while (
            w.stats()["tables"]["user"]["cache"]["size"] < keys.shape[0]
            and time.monotonic() < deadline
        ):
            time.sleep(0.01)
        # The first device lookup compiles this dim's serving kernels (seconds on a machine
        # with no CuPy kernel cache): done before v2, so that the 5 s below are the stream's.
        # (At 1fd2cbc one run spent them compiling and saw only v1.)
        assert bool((w.lookup_device("user", keys)[:, 0] == 1).all())
        pub.publish("user", keys, table_rows(keys, 2), 2)
        pub.commit(2)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            # a bounded read may wait for the worker to catch up, as users are told to
            dev = w.lookup_device("user", keys, consistency="bounded", timeout=10)
            if bool((dev[:, 0] == 2).all()):
                break
            time.sleep(0.005)
        assert isinstance(dev, cupy.ndarray)
        np.testing.assert_array_equal(cupy.asnumpy(dev)[:, 1], (keys % 1000).astype(np.float32))
        assert bool((dev[:, 0] == 2).all())
        if mode == "process":
            s = w.stats()
            assert s["ingest_process"]["relay"]["rows"] >= 2 * keys.shape[0]
            # the GPU cache's counters (capacity 16 k rows: not every key fits)
            assert s["tables"]["user"]["cache"]["size"] == len(w._tables["user"].cache) > 0


def test_cuda_worker_whose_ingest_process_is_killed_keeps_serving_its_gpu_cache(
    worker_env, tmp_path: Path
) -> None:
    _, cfg, pub = worker_env()
    store = empty_store(cfg, tmp_path / "store")
    keys = np.arange(5000, dtype=np.int64)
    pub.publish("user", keys, table_rows(keys, 1), 1)
    pub.commit(1)
    w = InferenceWorker(cfg, store, device="cuda", ingest="process").start()
    try:
        w.wait_ready(60)
        assert (w.lookup("user", keys, consistency="bounded")[:, 0] == 1).all()
        os.kill(w.stats()["ingest_process"]["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 5
        while w.ready() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "exited with signal 9" in (w.not_ready_reason() or "")
        with pytest.raises(StaleReadError, match="ingest stopped"):
            w.lookup("user", keys, consistency="bounded")
        assert (w.lookup("user", keys)[:, 0] == 1).all()  # what the GPU cache holds
    finally:
        t0 = time.monotonic()
        w.stop()
        assert time.monotonic() - t0 < 10
