"""Scale-out: three sparse shards and a main over the embedded broker, against one single server;
the same as deployed (``streamhps plan``, ``serve --role sparse|main`` processes; slow); sparse
workers on two GPUs (gpu marker).

Two processor shards (``--shard 0/2``, ``1/2``) write two stores; every worker reads both (the
placement's partitions ``p % 3`` cut across the processors' ``p % 2``). The placement is the
checked-in ``scaleout_placement.json`` (row-wise, 3 shards), which ``streamhps plan`` regenerates.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from servers.app import InferenceServer
from servers.model import DenseModel
from streamhps import Config, Publisher
from streamhps.client import InferenceClient, ShardedClient
from streamhps.errors import (
    ConfigError,
    MissingKeyError,
    NotOwnedError,
    ServerError,
    ShardUnavailableError,
    StaleReadError,
)
from streamhps.partitioning import partition_of
from streamhps.placement import Placement, plan
from streamhps.routing import ShardRouter
from streamhps.testing import start_processor, stop_processor, wait_for_applied_version
from streamhps.worker import InferenceWorker

pytestmark = pytest.mark.integration

PLACEMENT = Path(__file__).with_name("scaleout_placement.json")
ROOT = Path(__file__).resolve().parents[2]
CONFIG = """\
topic_prefix = "{prefix}"
[kafka]
"bootstrap.servers" = "{bootstrap}"
[[tables]]
name = "user"
dim = 8
partitions = 6
missing = "error"
[[tables]]
name = "item"
dim = 8
partitions = 6
missing = "zeros"
[serving]
max_staleness_s = 5.0
[processor]
batch_max_seconds = 0.02
lmdb_sync = false
"""
USERS = np.arange(1000, 1600, dtype=np.int64)
ITEMS = np.arange(0, 300, dtype=np.int64) * 7919


def dense_state(seed: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "bottom.0.weight": rng.standard_normal((8, 2)).astype(np.float32),
        "bottom.0.bias": rng.standard_normal(8).astype(np.float32),
        "top.0.weight": rng.standard_normal((4, 8 + 3)).astype(np.float32),
        "top.0.bias": rng.standard_normal(4).astype(np.float32),
        "top.2.weight": rng.standard_normal((1, 4)).astype(np.float32),
        "top.2.bias": rng.standard_normal(1).astype(np.float32),
    }


@dataclass
class Sparse:
    worker: InferenceWorker
    server: InferenceServer


@dataclass
class ScaleOut:
    config: Config
    stores: Path
    placement: Placement
    publisher: Publisher
    single: InferenceServer
    sparse: list[Sparse]
    router: ShardRouter
    main: InferenceServer
    rows: dict[str, np.ndarray] = field(default_factory=dict)  # table -> vectors of v1

    @property
    def urls(self) -> list[str]:
        return [s.server.url for s in self.sparse]

    def start_sparse(self, i: int, port: int = 0) -> Sparse:
        w = InferenceWorker(
            self.config, self.stores, placement=self.placement, shard=i, follow_dense=False
        ).start()
        srv = InferenceServer(w, self.config, port=port, role="sparse", sample_interval=0.25)
        return Sparse(w, srv.start())


def _wait(cond: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def so(bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ScaleOut]:
    tmp = tmp_path_factory.mktemp("scaleout")
    cfg_path = tmp / "streamhps.toml"
    cfg_path.write_text(CONFIG.format(prefix=f"so{uuid.uuid4().hex[:10]}", bootstrap=bootstrap))
    cfg = Config.load(cfg_path)
    placement = Placement.load(PLACEMENT)
    rng = np.random.default_rng(7)
    rows = {
        "user": rng.standard_normal((USERS.size, 8)).astype(np.float32),
        "item": rng.standard_normal((ITEMS.size, 8)).astype(np.float32),
    }
    pub = Publisher.from_config(cfg)
    pub.create_topics()
    pub.publish("user", USERS, rows["user"], version=1)
    pub.publish("item", ITEMS, rows["item"], version=1)
    pub.commit(1)
    pub.publish_dense(dense_state(), version=1)
    pub.flush()
    stores = tmp / "stores"
    procs = [
        start_processor(cfg_path, stores / str(i), shard=f"{i}/2", log_path=tmp / f"p{i}.log")
        for i in range(2)
    ]
    started: list[Any] = []
    try:
        for i, proc in enumerate(procs):
            for table in ("user", "item"):
                wait_for_applied_version(stores / str(i), table, 1, timeout=60, proc=proc)
        single_worker = InferenceWorker(cfg, stores).start()
        started.append(single_worker)
        single = InferenceServer(single_worker, cfg, port=0, sample_interval=0.25).start()
        started.append(single)
        so = ScaleOut(cfg, stores, placement, pub, single, [], None, None, rows)  # type: ignore[arg-type]
        for i in range(placement.n_shards):
            sp = so.start_sparse(i)
            so.sparse.append(sp)
        router = ShardRouter(cfg, placement, so.urls, health_interval_s=0.05).start()
        so.router = router
        so.main = InferenceServer(router, cfg, port=0, role="main", sample_interval=0.25).start()
        single_worker.wait_ready(30)
        router.wait_ready(30)
        _wait(lambda: so.main.model is not None and so.single.model is not None, "dense model")
        yield so
    finally:
        if so.main is not None:
            so.main.stop()
        if so.router is not None:
            so.router.stop()
        for sp in so.sparse:
            sp.server.stop()
            sp.worker.stop()
        for x in reversed(started):
            x.stop()
        for proc in procs:
            stop_processor(proc)
        pub.close()


def test_the_checked_in_placement_is_what_plan_writes(so: ScaleOut) -> None:
    p = plan(so.config, 3, strategy="row", rows={"user": 600, "item": 300}, backend="numpy")
    want = {k: v for k, v in p.to_dict().items() if k != "topic_prefix"}
    have = {k: v for k, v in so.placement.to_dict().items() if k != "topic_prefix"}
    assert have == want


def test_main_answers_equal_the_single_server(so: ScaleOut) -> None:
    single, main = InferenceClient(so.single.url), InferenceClient(so.main.url)
    # every key, shuffled and repeated, plus item keys nobody published (zeros policy)
    rng = np.random.default_rng(1)
    users = rng.permutation(np.concatenate([USERS, USERS[:50]]))
    items = rng.permutation(np.concatenate([ITEMS, np.arange(1, 40) * 13 + 1]))
    for table, keys in (("user", users), ("item", items)):
        want = single.lookup(table, keys)
        np.testing.assert_array_equal(main.lookup(table, keys), want)
        np.testing.assert_array_equal(main.lookup(table, keys, consistency="bounded"), want)
    got = main.lookup_many({"user": users, "item": items})
    np.testing.assert_array_equal(got["user"], single.lookup("user", users))
    np.testing.assert_array_equal(got["item"], single.lookup("item", items))
    np.testing.assert_array_equal(
        single.lookup("user", USERS), so.rows["user"]
    )  # and that is what was published
    # a key nobody published in an "error" table: refused by both, the same way
    for c in (single, main):
        with pytest.raises(MissingKeyError):
            c.lookup("user", [USERS[0], 5])
    # predict: same scores, same dense version
    n = 256
    feats = {"user": rng.choice(USERS, n), "item": rng.choice(ITEMS, n)}
    x = rng.standard_normal((n, 2)).astype(np.float32)
    a, b = single.predict_raw(feats, x), main.predict_raw(feats, x)
    assert a["dense_version"] == b["dense_version"] == 1
    np.testing.assert_allclose(b["scores"], a["scores"], rtol=1e-6, atol=1e-7)
    ref = DenseModel(dense_state(), ["user", "item"], 1).predict(
        [single.lookup("user", feats["user"]), single.lookup("item", feats["item"])], x
    )
    np.testing.assert_allclose(b["scores"], ref, rtol=1e-5, atol=1e-6)
    # the fan-out really went to every shard, one request per shard
    st = main.status()["worker"]
    assert st["role"] == "main" and st["fanout"]["shard_requests"] >= 3
    _wait(  # shard stats are cached for half a second
        lambda: all(s["lookups"]["keys"] > 0 for s in main.status()["worker"]["shards"]),
        "every shard counted lookups",
    )


def test_sharded_client_routes_like_the_main(so: ScaleOut) -> None:
    single = InferenceClient(so.single.url)
    with ShardedClient(PLACEMENT, so.urls) as c:
        assert c.ready()
        got = c.lookup_many({"user": USERS[::-1], "item": ITEMS})
        np.testing.assert_array_equal(got["user"], single.lookup("user", USERS[::-1]))
        np.testing.assert_array_equal(got["item"], single.lookup("item", ITEMS))
        stal = c.staleness()
        assert {t: sorted(ps) for t, ps in stal.items()} == {
            "user": list(range(6)),
            "item": list(range(6)),
        }


def test_a_token_guards_the_shards_and_the_main_passes_it_on(so: ScaleOut) -> None:
    """Sparse shards run with a token; a main given the token fans out through them, one
    without it is not ready and says why; clients need it too."""
    token = "scale-out-token"
    guarded = [
        InferenceServer(sp.worker, so.config, port=0, role="sparse", auth_token=token).start()
        for sp in so.sparse
    ]
    urls = [g.url for g in guarded]
    with_token = ShardRouter(so.config, so.placement, urls, health_interval_s=0.05,
                             follow_dense=False, token=token)  # fmt: skip
    without = ShardRouter(so.config, so.placement, urls, health_interval_s=0.05, follow_dense=False)
    try:
        with_token.start().wait_ready(30)
        single = InferenceClient(so.single.url)
        np.testing.assert_array_equal(
            with_token.lookup("user", USERS[::-1]), single.lookup("user", USERS[::-1])
        )
        without.start()
        with pytest.raises(StaleReadError, match="--auth-token-file"):
            without.wait_ready(2)
        with ShardedClient(so.placement, urls, token=token) as c:
            np.testing.assert_array_equal(c.lookup("item", ITEMS), single.lookup("item", ITEMS))
        with ShardedClient(so.placement, urls) as c, pytest.raises(ServerError, match="token"):
            c.lookup("item", ITEMS)
    finally:
        with_token.stop()
        without.stop()
        for g in guarded:
            g.stop()


def test_a_sparse_shard_refuses_keys_it_does_not_serve_and_predicts(so: ScaleOut) -> None:
    shard0 = InferenceClient(so.urls[0])
    parts = partition_of(USERS, 6)
    mine, theirs = USERS[parts % 3 == 0], USERS[parts % 3 == 1]
    np.testing.assert_array_equal(
        shard0.lookup("user", mine), InferenceClient(so.single.url).lookup("user", mine)
    )
    with pytest.raises(NotOwnedError, match=r"not served by shard 0 of 3.*served by shard 1") as e:
        shard0.lookup("user", np.concatenate([mine[:2], theirs[:1]]))
    assert e.value.status == 421
    with pytest.raises(ServerError, match="sparse shard") as e2:
        shard0.predict({"user": mine[:1], "item": ITEMS[:1]}, [[0.0, 0.0]])
    assert e2.value.status == 404
    # its staleness covers its own partitions only
    assert {t: sorted(map(int, ps)) for t, ps in shard0.status()["staleness"].items()} == {
        "user": [0, 3],
        "item": [0, 3],
    }


def test_updates_published_after_start_are_visible_through_the_main(so: ScaleOut) -> None:
    main = InferenceClient(so.main.url)
    keys = np.concatenate([USERS[:100], np.arange(5000, 5040, dtype=np.int64)])  # new keys too
    vecs = np.full((keys.size, 8), 2.0, dtype=np.float32)
    vecs[:, 1] = np.arange(keys.size)
    so.publisher.publish("user", keys, vecs, version=2)
    so.publisher.commit(2)

    def visible() -> bool:
        try:
            return np.array_equal(main.lookup("user", keys), vecs)
        except MissingKeyError:  # the new keys, not there yet
            return False

    _wait(visible, "version 2 through the main", 30)
    np.testing.assert_array_equal(main.lookup("user", keys, consistency="bounded"), vecs)
    # and a new dense model reaches the main, which it follows itself
    so.publisher.publish_dense(dense_state(9), version=2)
    so.publisher.flush()
    _wait(lambda: so.main.model is not None and so.main.model.version == 2, "dense v2", 30)


def test_main_status_reports_every_partition_from_its_shard(so: ScaleOut) -> None:
    main = InferenceClient(so.main.url)
    assert main.ready() == (True, None)
    st = main.status()
    for table in ("user", "item"):
        rows = st["staleness"][table]
        assert sorted(int(p) for p in rows) == list(range(6))
        for p, row in rows.items():
            assert row["shard"] == int(p) % 3 and row["seconds"] < 5.0
    assert "streamhps_ready 1" in main.metrics()


def test_placement_for_another_config_is_refused(so: ScaleOut) -> None:
    other = Config.from_dict({"tables": [{"name": "user", "dim": 8, "partitions": 4}]})
    with pytest.raises(ConfigError, match="run `streamhps plan` again"):
        InferenceWorker(other, so.stores, placement=so.placement, shard=0)
    with pytest.raises(ConfigError):
        ShardRouter(other, so.placement, so.urls)
    with pytest.raises(ValueError, match="3 shards but 2 url"):
        ShardedClient(so.placement, so.urls[:2])


def test_a_killed_shard_makes_the_main_not_ready_and_bounded_reads_refuse(so: ScaleOut) -> None:
    main = InferenceClient(so.main.url)
    parts = partition_of(USERS, 6)
    on_1, on_0 = USERS[parts % 3 == 1], USERS[parts % 3 == 0]
    victim = so.sparse[1]
    port = victim.server.port
    victim.server.stop()
    victim.worker.stop()
    try:
        _wait(lambda: not so.router.ready(), "main not ready")
        reason = so.router.not_ready_reason() or ""
        assert "shard 1" in reason and str(port) in reason, reason
        ok, why = main.ready()
        assert not ok and "shard 1" in (why or "")
        with pytest.raises(StaleReadError, match="shard 1") as e:
            main.lookup("user", USERS[:50], consistency="bounded")
        assert e.value.status == 503
        with pytest.raises(ShardUnavailableError, match="shard 1"):
            so.router.lookup("user", on_1, consistency="bounded")
        with pytest.raises(ShardUnavailableError):  # nothing else holds those rows
            main.lookup("user", on_1)
        # keys of the other shards are still served
        np.testing.assert_array_equal(
            main.lookup("user", on_0), InferenceClient(so.single.url).lookup("user", on_0)
        )
        with pytest.raises(ShardUnavailableError, match="shard 1"):
            main.predict({"user": on_1[:2], "item": ITEMS[:2]}, np.zeros((2, 2)))
    finally:
        so.sparse[1] = so.start_sparse(1, port=port)  # restarted on the same address
    so.router.wait_ready(30)
    assert main.ready() == (True, None)
    np.testing.assert_array_equal(
        main.lookup("user", on_1, consistency="bounded"),
        InferenceClient(so.single.url).lookup("user", on_1),
    )


# ---------------------------------------------------------------------- as deployed


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def deployed(bootstrap: str, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("scaleout-proc")
    cfg_path = tmp / "streamhps.toml"
    cfg_path.write_text(CONFIG.format(prefix=f"sp{uuid.uuid4().hex[:10]}", bootstrap=bootstrap))
    cfg = Config.load(cfg_path)
    rng = np.random.default_rng(3)
    rows = {
        "user": rng.standard_normal((USERS.size, 8)).astype(np.float32),
        "item": rng.standard_normal((ITEMS.size, 8)).astype(np.float32),
    }
    with Publisher.from_config(cfg) as pub:
        pub.create_topics()
        pub.publish("user", USERS, rows["user"], version=1)
        pub.publish("item", ITEMS, rows["item"], version=1)
        pub.commit(1)
        pub.publish_dense(dense_state(), version=1)
        pub.flush()
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    stores = tmp / "stores"
    procs = [
        start_processor(
            cfg_path, stores / str(i), shard=f"{i}/2", log_path=tmp / f"p{i}.log", env=env
        )
        for i in range(2)
    ]
    servers: list[subprocess.Popen[bytes]] = []
    try:
        for i, proc in enumerate(procs):
            for table in rows:
                wait_for_applied_version(stores / str(i), table, 1, timeout=60, proc=proc)
        placement = tmp / "placement.json"
        # the plan command, as an operator runs it: table-wise over 2 shards
        subprocess.run(
            [sys.executable, "-m", "streamhps", "plan", "--config", str(cfg_path), "--shards", "2",
             "--strategy", "table", "--rows", "user=600", "--rows", "item=300", "--out", str(placement)],
            check=True, env=env, capture_output=True,
        )  # fmt: skip

        def serve(name: str, *args: str) -> str:
            port = _port()
            log = open(tmp / f"{name}.log", "ab")  # noqa: SIM115 - the child holds it
            servers.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "streamhps",
                        "serve",
                        "--config",
                        str(cfg_path),
                        "--port",
                        str(port),
                        *args,
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                )  # fmt: skip
            )
            log.close()
            return f"http://127.0.0.1:{port}"

        urls = [
            serve(f"sparse{i}", "--role", "sparse", "--placement", str(placement), "--shard",
                  str(i), "--store", str(stores / "0"), "--store", str(stores / "1"))
            for i in range(2)
        ]  # fmt: skip
        main = serve(
            "main", "--role", "main", "--placement", str(placement), "--shards", ",".join(urls)
        )
        InferenceClient(main).wait_ready(90)
        yield Placement.load(placement), urls, main, rows
    finally:
        for s in servers:
            s.send_signal(signal.SIGTERM)
        for s in servers:
            try:
                assert s.wait(20) == 0, "serve did not stop cleanly on SIGTERM"
            except subprocess.TimeoutExpired:
                s.kill()
                s.wait()
        for proc in procs:
            stop_processor(proc)


@pytest.mark.slow
def test_plan_sparse_and_main_processes_serve_exactly(deployed) -> None:  # type: ignore[no-untyped-def]
    placement, urls, main, rows = deployed
    assert placement.strategy == "table" and placement.n_shards == 2
    c = InferenceClient(main)
    got = c.lookup_many({"user": USERS, "item": ITEMS})
    np.testing.assert_array_equal(got["user"], rows["user"])
    np.testing.assert_array_equal(got["item"], rows["item"])
    # table-wise: each table lives on one shard; the other refuses it, naming the owner
    owner = int(placement.owner_of_partitions("user")[0])
    with pytest.raises(NotOwnedError, match=f"shard\\(s\\) \\[{owner}\\] serve it"):
        InferenceClient(urls[1 - owner]).lookup("user", USERS[:3])
    with ShardedClient(placement, urls) as sc:
        np.testing.assert_array_equal(sc.lookup("item", ITEMS[::-1]), rows["item"][::-1])
    deadline = time.monotonic() + 30
    while (c.status().get("dense_model") or {}).get("version") is None:
        assert time.monotonic() < deadline, "the main never got the dense model"
        time.sleep(0.1)
    x = np.random.default_rng(0).standard_normal((64, 2)).astype(np.float32)
    feats = {"user": USERS[:64], "item": ITEMS[:64]}
    want = DenseModel(dense_state(), ["user", "item"], 1).predict(
        [rows["user"][:64], rows["item"][:64]], x
    )
    np.testing.assert_allclose(c.predict(feats, x), want, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_sparse_workers_on_two_gpus(bootstrap: str, tmp_path: Path) -> None:
    """Two sparse shards on cuda:0 and cuda:1 (both on cuda:0 with one GPU) and a main."""
    import cupy

    from servers.app import InferenceServer
    from streamhps.placement import plan
    from streamhps.routing import ShardRouter
    from streamhps.worker import InferenceWorker

    gpus = cupy.cuda.runtime.getDeviceCount()
    cfg_path = tmp_path / "c.toml"
    cfg_path.write_text(CONFIG.format(prefix=f"g{uuid.uuid4().hex[:10]}", bootstrap=bootstrap))
    cfg = Config.load(cfg_path)
    vec = np.random.default_rng(5).standard_normal((USERS.size, 8)).astype(np.float32)
    with Publisher.from_config(cfg) as pub:
        pub.create_topics()
        pub.publish("user", USERS, vec, version=1)
        pub.publish("item", ITEMS, np.ones((ITEMS.size, 8), np.float32), version=1)
        pub.commit(1)
    proc = start_processor(cfg_path, tmp_path / "store", log_path=tmp_path / "p.log")
    workers, servers = [], []
    try:
        wait_for_applied_version(tmp_path / "store", "user", 1, timeout=60, proc=proc)
        p = plan(cfg, 2, strategy="row")
        for i in range(2):
            w = InferenceWorker(
                cfg, tmp_path / "store", f"cuda:{i % gpus}", placement=p, shard=i,
                follow_dense=False,
            ).start()  # fmt: skip
            workers.append(w)
            servers.append(InferenceServer(w, cfg, port=0, role="sparse").start())
        for i, w in enumerate(workers):
            w.wait_ready(120)
            for st in w._tables.values():  # the caches live on the worker's GPU
                assert st.cache._vals.device.id == i % gpus
        with ShardRouter(cfg, p, [s.url for s in servers], follow_dense=False) as router:
            router.wait_ready(60)
            np.testing.assert_array_equal(router.lookup("user", USERS), vec)
            np.testing.assert_array_equal(
                router.lookup_many({"item": ITEMS}, consistency="bounded", timeout=30)["item"],
                np.ones((ITEMS.size, 8), np.float32),
            )
    finally:
        for s in servers:
            s.stop()
        for w in workers:
            w.stop()
        stop_processor(proc)
