"""Predict through the server on the worker's device: ``lookup_many`` + the torch module, with
dynamic batching; the same tests on a cpu worker (CI) and a cuda worker (``gpu``)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from servers.app import InferenceServer
from servers.model import DenseModel
from streamhps import Config, Publisher, StreamHPSError
from streamhps.client import InferenceClient
from streamhps.models import DLRMDense
from streamhps.store import LmdbStore
from streamhps.store.base import WriteBatch
from streamhps.worker import InferenceWorker

pytestmark = pytest.mark.integration

DIM, NUM_DENSE, TABLES = 16, 4, ("user", "item")


def _state(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    m = DLRMDense(NUM_DENSE, (32, DIM), (16,), len(TABLES))
    return {
        k: 0.3 * rng.standard_normal(v.shape).astype(np.float32) for k, v in m.dense_state().items()
    }


@pytest.fixture(scope="module", params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def served(
    request: pytest.FixtureRequest, bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("predict")
    lines = [
        f'topic_prefix = "p{uuid.uuid4().hex[:10]}"',
        "[kafka]",
        f'"bootstrap.servers" = "{bootstrap}"',
    ]
    for t in TABLES:
        lines += [
            "[[tables]]",
            f'name = "{t}"',
            f"dim = {DIM}",
            "partitions = 2",
            'missing = "error"',
        ]
    lines += [
        "[serving]",
        "max_staleness_s = 5.0",
        "warm_from_store = false",
        "max_lookup_keys = 20000",
    ]
    (tmp / "c.toml").write_text("\n".join(lines) + "\n")
    cfg = Config.load(tmp / "c.toml")
    rng = np.random.default_rng(0)
    rows = {
        t: (
            np.arange(2000, dtype=np.int64) * 7 + i,
            rng.standard_normal((2000, DIM)).astype(np.float32),
        )
        for i, t in enumerate(TABLES)
    }
    with LmdbStore.open(tmp / "store", readonly=False) as st:  # the rows a processor wrote
        st.ensure_tables({t.name: t for t in cfg.tables})
        batch = WriteBatch()
        for t, (k, v) in rows.items():
            batch.table_rows(t).add(k, v, np.ones(k.size, np.int64))
        st.write_batch(batch)
    pub = Publisher.from_config(cfg)
    pub.create_topics()
    pub.publish_dense(_state(1), version=1)
    pub.flush()
    worker = InferenceWorker(cfg, tmp / "store", device=str(request.param)).start()
    server = None
    try:
        worker.wait_ready(60)
        server = InferenceServer(
            worker, cfg, port=0, max_batch_rows=4096, max_queue_delay_ms=2.0
        ).start()
        deadline = time.monotonic() + 30
        while server.model is None:
            assert time.monotonic() < deadline, "the dense model never arrived"
            time.sleep(0.02)
        yield {"config": cfg, "worker": worker, "server": server, "publisher": pub, "rows": rows,
               "client": InferenceClient(server.url)}  # fmt: skip
    finally:
        if server is not None:
            server.stop()
        worker.stop()
        pub.close()


def _oracle(
    served: dict[str, Any], state: dict[str, np.ndarray], idx: dict[str, np.ndarray], x: np.ndarray
) -> np.ndarray:
    embs = [served["rows"][t][1][idx[t]] for t in TABLES]
    return DenseModel(state, TABLES, 1).predict(embs, x)


def _request(
    served: dict[str, Any], rng: np.random.Generator, n: int
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray]:
    idx = {t: rng.integers(0, 2000, n) for t in TABLES}
    feats = {t: served["rows"][t][0][idx[t]] for t in TABLES}
    return idx, feats, rng.standard_normal((n, NUM_DENSE)).astype(np.float32)


def _version(served: dict[str, Any]) -> int:
    return int(served["server"].model.version)


def test_predict_runs_the_published_model_on_the_workers_rows(served) -> None:  # type: ignore[no-untyped-def]
    c, server = served["client"], served["server"]
    assert server.model.device.type == served["worker"].torch_device.split(":")[0]
    rng = np.random.default_rng(1)
    version = _version(served)
    state = _state(version)
    idx, feats, x = _request(served, rng, 700)  # cold caches: rows come from LMDB
    want = _oracle(served, state, idx, x)
    got = c.predict(feats, x)  # binary
    assert got.dtype == np.float32 and got.shape == (700,)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    raw = c.predict_raw(feats, x, binary=False)  # JSON
    assert raw["dense_version"] == version
    np.testing.assert_allclose(raw["scores"], want, rtol=1e-4, atol=1e-6)
    raw = c.predict_raw(feats, x)
    assert raw["dense_version"] == version
    np.testing.assert_allclose(raw["scores"], want, rtol=1e-4, atol=1e-6)
    assert c.predict({t: f[:0] for t, f in feats.items()}, x[:0]).shape == (0,)
    assert server.counters["predicts"] >= 4


def test_concurrent_predicts_are_batched_and_each_client_gets_its_own_scores(served) -> None:  # type: ignore[no-untyped-def]
    server = served["server"]
    state = _state(_version(served))
    before = server.batcher.stats.max_requests_in_batch
    results: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    errors: list[BaseException] = []

    def client(i: int) -> None:
        c = InferenceClient(server.url)
        rng = np.random.default_rng(100 + i)
        try:
            for _ in range(5):
                idx, feats, x = _request(served, rng, 16 + i)
                results[i] = (c.predict(feats, x), _oracle(served, state, idx, x))
                np.testing.assert_allclose(*results[i], rtol=1e-4, atol=1e-6)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[0]
    assert len(results) == 32
    assert max(before, server.batcher.stats.max_requests_in_batch) > 1  # requests were merged


def test_dense_swaps_under_concurrent_traffic_are_atomic(served) -> None:  # type: ignore[no-untyped-def]
    """Every answer equals the forward pass of exactly the version it reports."""
    server, pub = served["server"], served["publisher"]
    base = _version(served) + 1
    rng = np.random.default_rng(7)
    idx, feats, x = _request(served, rng, 64)
    want = {v: _oracle(served, _state(v), idx, x) for v in range(base, base + 5)}
    want[base - 1] = _oracle(served, _state(base - 1), idx, x)
    answers: list[dict[str, Any]] = []
    done = threading.Event()

    def traffic() -> None:
        c = InferenceClient(server.url)
        while not done.is_set():
            answers.append(c.predict_raw(feats, x))

    threads = [threading.Thread(target=traffic) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for v in range(base, base + 5):
            pub.publish_dense(_state(v), version=v)
            pub.flush()
            time.sleep(0.3)
        deadline = time.monotonic() + 15
        while _version(served) < base + 4:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(0.2)
    finally:
        done.set()
        for t in threads:
            t.join(10)
    seen = {a["dense_version"] for a in answers}
    assert len(seen & set(want)) >= 3, seen  # the swaps happened under traffic
    for a in answers:
        np.testing.assert_allclose(a["scores"], want[a["dense_version"]], rtol=1e-4, atol=1e-6)


def test_bad_binary_predicts_say_what_is_wrong(served) -> None:  # type: ignore[no-untyped-def]
    c = served["client"]
    rng = np.random.default_rng(3)
    _, feats, x = _request(served, rng, 4)
    cases = [
        (lambda: c.predict({"user": feats["user"]}, x), "lacks ids for table"),
        (lambda: c.predict({**feats, "item": feats["item"][:3]}, x), "one id per example"),
        (lambda: c.predict(feats, x[:3]), "'dense' has shape"),
        (lambda: c.predict(feats), "'dense' is required"),
        (lambda: c.predict({**feats, "ghost": feats["user"]}, x), "unknown table 'ghost'"),
        (lambda: c.predict({**feats, "user": np.array([1, 2, 3, 4])}, x), "never published"),
        (lambda: c.predict(feats, np.full_like(x, np.nan)), "NaN"),
    ]
    for call, needle in cases:
        with pytest.raises(StreamHPSError, match=needle):
            call()
    with pytest.raises(ValueError, match="integer ids"):
        c.predict({"user": [1.5], "item": [2]}, x[:1])
