"""The inference server and its client, against a real broker, processor, LMDB store and worker."""

from __future__ import annotations

import asyncio
import http.client
import json
import time

import numpy as np
import pytest

from servers.app import InferenceServer
from servers.model import DenseModel
from streamhps import Config, MissingKeyError, ServerError, UnknownTableError
from streamhps.client import AsyncInferenceClient, InferenceClient
from streamhps.worker import InferenceWorker

pytestmark = pytest.mark.integration


def _raw(
    url: str, method: str, path: str, body: bytes | None = None, ctype: str | None = None
) -> tuple[int, dict[str, str], bytes]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": ctype} if ctype else {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def _wait_equal(fn, expected: np.ndarray, timeout: float = 15.0) -> np.ndarray:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if np.array_equal(got, expected) or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


def test_lookups_return_exactly_the_published_rows(deployment) -> None:  # type: ignore[no-untyped-def]
    c = deployment.client
    for table, (keys, vecs) in deployment.rows.items():
        pick = np.random.default_rng(1).choice(keys.size, 50, replace=False)
        got = c.lookup(table, keys[pick], binary=False)  # JSON form
        assert got.dtype == np.float32 and got.shape == (50, 8)
        np.testing.assert_array_equal(got, vecs[pick])
        got_bin = c.lookup(table, keys, binary=True)  # binary form, every key (both partitions)
        np.testing.assert_array_equal(got_bin, vecs)


def test_large_batches_with_repeated_keys_stay_exact(deployment) -> None:  # type: ignore[no-untyped-def]
    keys, vecs = deployment.rows["user"]
    idx = np.random.default_rng(2).integers(0, keys.size, 9000)  # with repeats
    for binary in (True, False):
        np.testing.assert_array_equal(
            deployment.client.lookup("user", keys[idx], binary=binary), vecs[idx]
        )


def test_published_updates_become_visible(deployment) -> None:  # type: ignore[no-untyped-def]
    keys, old = deployment.rows["item"]
    changed = keys[:40]
    new = (old[:40] + 100.0).astype(np.float32)
    deployment.publisher.publish("item", changed, new, version=2)
    deployment.publisher.commit(2)
    got = _wait_equal(lambda: deployment.client.lookup("item", changed), new)
    np.testing.assert_array_equal(got, new)
    np.testing.assert_array_equal(deployment.client.lookup("item", keys[40:]), old[40:])
    deployment.rows["item"] = (keys, np.concatenate([new, old[40:]]))


def test_missing_keys_follow_the_table_policy(deployment) -> None:  # type: ignore[no-untyped-def]
    c = deployment.client
    with pytest.raises(MissingKeyError) as e:
        c.lookup("user", [1000, 999_999_999])
    assert e.value.status == 404
    assert "999999999" in str(e.value)
    np.testing.assert_array_equal(
        c.lookup("item", [5]), np.zeros((1, 8), np.float32)
    )  # missing = "zeros"


@pytest.mark.parametrize(
    ("body", "ctype", "status", "needle"),
    [
        (b'{"table": "user", "keys": [1, 2', "application/json", 400, "malformed JSON"),
        (b'{"table": "nope", "keys": [1]}', "application/json", 404, "unknown table 'nope'"),
        (b'{"table": "user", "keys": ["a", "b"]}', "application/json", 400, "integer ids"),
        (b'{"table": "user", "keys": [1.5]}', "application/json", 400, "integer ids"),
        (b'{"table": "user", "keys": [[1, 2]]}', "application/json", 400, "integer ids"),
        (b'{"table": "user", "keys": 5}', "application/json", 400, "JSON array"),
        (b'{"table": "user"}', "application/json", 400, '"keys"'),
        (
            b'{"table": "user", "keys": [1], "vectors": [[1]]}',
            "application/json",
            400,
            "unknown field",
        ),
        (
            b'{"table": "user", "keys": [1], "consistency": "strong"}',
            "application/json",
            400,
            "consistency",
        ),
        (b"[1, 2, 3]", "application/json", 400, "JSON object"),
        (b"table=user", "text/plain", 415, "Content-Type"),
        (
            json.dumps({"table": "user", "keys": list(range(10001))}).encode(),
            "application/json",
            413,
            "limit is 10000",
        ),
    ],
)
def test_bad_requests_answer_4xx_saying_what_was_wrong(
    deployment, body, ctype, status, needle
) -> None:  # type: ignore[no-untyped-def]
    code, headers, data = _raw(deployment.server.url, "POST", "/v1/lookup", body, ctype)
    assert code == status, data
    err = json.loads(data)["error"]
    assert needle in err["message"], err


def test_bad_binary_requests(deployment) -> None:  # type: ignore[no-untyped-def]
    url = deployment.server.url
    code, _, data = _raw(
        url, "POST", "/v1/lookup?table=user", b"\x01" * 12, "application/octet-stream"
    )
    assert code == 400 and b"multiple of 8" in data
    code, _, data = _raw(url, "POST", "/v1/lookup", b"\x00" * 8, "application/octet-stream")
    assert code == 400 and b"table" in data
    code, _, data = _raw(
        url, "POST", "/v1/lookup?table=zzz", b"\x00" * 8, "application/octet-stream"
    )
    assert code == 404 and b"unknown table" in data


def test_client_raises_streamhps_errors_with_the_server_message(deployment) -> None:  # type: ignore[no-untyped-def]
    c = deployment.client
    with pytest.raises(UnknownTableError, match="unknown table 'ghost'"):
        c.lookup("ghost", [1])
    with pytest.raises(ServerError, match="limit is 10000") as e:
        c.lookup("user", np.arange(10001), binary=False)
    assert e.value.status == 413
    with pytest.raises(ValueError, match="integer ids"):
        c.lookup("user", [1.5, 2.0])


def test_no_route_writes_a_row(deployment) -> None:  # type: ignore[no-untyped-def]
    url = deployment.server.url
    keys, vecs = deployment.rows["user"]
    payload = json.dumps(
        {"table": "user", "keys": [int(keys[0])], "vectors": [[0.0] * 8], "version": 99}
    ).encode()
    for method in ("PUT", "PATCH", "DELETE"):
        for path in ("/v1/lookup", "/v1/predict", "/v1/status"):
            code, headers, data = _raw(url, method, path, payload, "application/json")
            assert code == 405, (method, path, code)
            assert "allow" in headers and method not in headers["allow"]
    for path in ("/v1/rows", "/v1/update", "/v1/upsert", "/v1/publish", "/admin"):
        for method in ("POST", "PUT"):
            code, _, _ = _raw(url, method, path, payload, "application/json")
            assert code == 404, (method, path, code)
    code, _, _ = _raw(url, "GET", "/v1/lookup")
    assert code == 405
    np.testing.assert_array_equal(deployment.client.lookup("user", keys), vecs)  # nothing changed


def test_health_ready_status_and_metrics(deployment) -> None:  # type: ignore[no-untyped-def]
    c = deployment.client
    assert c.healthy()
    assert c.ready() == (True, None)
    st = c.status()
    assert st["ready"] is True
    assert set(st["staleness"]) == {"user", "item"}
    part = st["staleness"]["user"]["0"]
    assert part["applied_version"] >= 1 and part["seconds"] <= st["max_staleness_s"]
    assert st["worker"]["tables"]["user"]["rows_applied"] >= 0
    c.lookup("user", deployment.rows["user"][0][:10])
    m = c.metrics()
    for needle in (
        'streamhps_staleness_seconds{table="user",partition="0"}',
        'streamhps_staleness_versions{table="item",partition="1"}',
        'streamhps_applied_version{table="user",partition="1"}',
        'streamhps_lookup_latency_seconds_bucket{table="user",le="+Inf"}',
        "# TYPE streamhps_rejected_messages_total counter",
        "streamhps_ready 1",
        'streamhps_cache_lookups_total{table="user",result="hit"}',
        'streamhps_ingest_rows_total{table="item"}',
        "# TYPE streamhps_lookup_latency_seconds histogram",
    ):
        assert needle in m, needle
    count = [
        ln
        for ln in m.splitlines()
        if ln.startswith('streamhps_lookup_latency_seconds_count{table="user"}')
    ]
    assert count and float(count[0].split()[-1]) >= 1


def test_status_page_and_its_data_endpoint(deployment) -> None:  # type: ignore[no-untyped-def]
    url = deployment.server.url
    code, headers, page = _raw(url, "GET", "/")
    assert code == 200 and headers["content-type"].startswith("text/html")
    html = page.decode()
    assert "/v1/history" in html and "<canvas" in html and "<script" in html
    assert (
        "http://" not in html.replace("http://www.w3.org", "") and "https://" not in html
    )  # no CDN
    deployment.client.lookup("user", deployment.rows["user"][0][:5])
    time.sleep(0.8)  # a few sampler ticks (0.25 s in this fixture)
    hist = deployment.client.history(seconds=60)
    assert hist["ready"] is True and hist["samples"]
    last = hist["samples"][-1]
    for key in (
        "staleness_s",
        "versions_behind",
        "applied_version",
        "hit_ratio",
        "ingest_rows_per_s",
    ):
        assert set(last[key]) == {"user", "item"}, key
    assert last["applied_version"]["user"] >= 1
    assert "visible_ms" in last  # publish -> visible of recent rows (None before any)


def test_predict_answers_503_until_a_dense_model_then_matches_the_model(deployment) -> None:  # type: ignore[no-untyped-def]
    c = deployment.client
    uk, uv = deployment.rows["user"]
    ik, iv = deployment.rows["item"]
    feats = {"user": uk[:20], "item": ik[:20]}
    dense_x = np.random.default_rng(3).standard_normal((20, 2)).astype(np.float32)
    if deployment.server.model is None:
        with pytest.raises(ServerError, match="no dense model") as e:
            c.predict(feats, dense_x)
        assert e.value.status == 503
    rng = np.random.default_rng(4)
    state = {
        "bottom.0.weight": rng.standard_normal((8, 2)).astype(np.float32),
        "bottom.0.bias": rng.standard_normal(8).astype(np.float32),
        "top.0.weight": rng.standard_normal((4, 8 + 3)).astype(np.float32),
        "top.0.bias": rng.standard_normal(4).astype(np.float32),
        "top.2.weight": rng.standard_normal((1, 4)).astype(np.float32),
        "top.2.bias": rng.standard_normal(1).astype(np.float32),
    }
    current = deployment.server.model
    version = (current.version if current else 0) + 1
    deployment.publisher.publish_dense(state, version=version)
    deployment.publisher.flush()
    deadline = time.monotonic() + 15
    while deployment.server.model is None or deployment.server.model.version < version:
        assert time.monotonic() < deadline, "dense model never arrived"
        time.sleep(0.05)
    out = c.predict_raw(feats, dense_x)
    assert out["dense_version"] == version
    item_vecs = deployment.client.lookup("item", ik[:20])
    want = DenseModel(state, ["user", "item"], version).predict([uv[:20], item_vecs], dense_x)
    np.testing.assert_allclose(out["scores"], want, rtol=1e-5, atol=1e-6)
    # malformed predicts say what is wrong
    with pytest.raises(ServerError, match="lacks ids for table"):
        c.predict({"user": uk[:2]}, dense_x[:2])
    with pytest.raises(ServerError, match="one id per example"):
        c.predict({"user": uk[:2], "item": ik[:3]}, dense_x[:2])
    with pytest.raises(ServerError, match="'dense' has shape"):
        c.predict({"user": uk[:2], "item": ik[:2]}, dense_x[:3])
    with pytest.raises(ServerError, match="'dense' is required"):
        c.predict({"user": uk[:2], "item": ik[:2]})


def test_async_client(deployment) -> None:  # type: ignore[no-untyped-def]
    keys, vecs = deployment.rows["user"]

    async def go() -> None:
        async with AsyncInferenceClient(deployment.server.url) as ac:
            await ac.wait_ready(10)
            got = await asyncio.gather(
                *(ac.lookup("user", keys[i : i + 10]) for i in range(0, 100, 10))
            )
            np.testing.assert_array_equal(np.concatenate(got), vecs[:100])
            assert (await ac.status())["ready"] is True
            with pytest.raises(UnknownTableError):
                await ac.lookup("nope", [1])

    asyncio.run(go())


def test_readyz_answers_503_with_the_reason_when_the_worker_is_not_ready(deployment) -> None:  # type: ignore[no-untyped-def]
    cfg = Config.load(deployment.config_path)
    idle = InferenceWorker.from_config(cfg, store=deployment.store)  # never started
    with InferenceServer(idle, cfg, port=0) as server:
        code, _, data = _raw(server.url, "GET", "/readyz")
        assert code == 503 and json.loads(data) == {"ready": False, "reason": "not started"}
        with pytest.raises(ServerError, match="not ready after .*not started"):
            InferenceClient(server.url).wait_ready(timeout=0.3)


def test_unreachable_server_raises_server_error() -> None:
    from streamhps.broker import free_port

    c = InferenceClient(f"http://127.0.0.1:{free_port()}", timeout=2)
    with pytest.raises(ServerError, match="Connection refused"):
        c.status()
    assert c.healthy() is False
    with pytest.raises(ServerError, match="not ready after"):
        c.wait_ready(timeout=0.3)


def test_dense_updates_swap_atomically_under_traffic(deployment) -> None:  # type: ignore[no-untyped-def]
    """Every answer equals the forward pass of exactly the version it reports: no request ever
    sees a half-swapped model."""
    import threading

    c = deployment.client
    uk, uv = deployment.rows["user"]
    ik, _ = deployment.rows["item"]
    feats = {"user": uk[:64], "item": ik[:64]}
    x = np.random.default_rng(5).standard_normal((64, 2)).astype(np.float32)
    item_vecs = c.lookup("item", ik[:64])
    states: dict[int, dict[str, np.ndarray]] = {}
    current = deployment.server.model
    base = (current.version if current else 0) + 1  # above any version another test published
    for v in range(base, base + 6):
        rng = np.random.default_rng(v)
        states[v] = {
            "bottom.0.weight": rng.standard_normal((8, 2)).astype(np.float32),
            "bottom.0.bias": rng.standard_normal(8).astype(np.float32),
            "top.0.weight": rng.standard_normal((4, 11)).astype(np.float32),
            "top.0.bias": rng.standard_normal(4).astype(np.float32),
            "top.2.weight": rng.standard_normal((1, 4)).astype(np.float32),
            "top.2.bias": rng.standard_normal(1).astype(np.float32),
        }
    want = {
        v: DenseModel(s, ["user", "item"], v).predict([uv[:64], item_vecs], x)
        for v, s in states.items()
    }
    answers: list[dict] = []  # type: ignore[type-arg]
    done = threading.Event()

    def traffic() -> None:
        while not done.is_set():
            answers.append(c.predict_raw(feats, x))

    t = threading.Thread(target=traffic)
    t.start()
    try:
        for v, s in states.items():
            deployment.publisher.publish_dense(s, version=v)
            deployment.publisher.flush()
            time.sleep(0.3)
        deadline = time.monotonic() + 15
        while deployment.server.model is None or deployment.server.model.version < base + 5:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.2)
    finally:
        done.set()
        t.join(10)
    seen = {a["dense_version"] for a in answers if a["dense_version"] in want}
    assert len(seen) >= 3, seen  # the swaps happened under traffic
    for a in answers:
        if a["dense_version"] in want:
            np.testing.assert_allclose(a["scores"], want[a["dense_version"]], rtol=1e-5, atol=1e-6)
