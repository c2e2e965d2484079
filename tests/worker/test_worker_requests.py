"""Request-level lookups: ``lookup_many`` over several tables and pooled (multi-hot) lookups.

The same tests run on the numpy backend (CI) and on the CUDA backend (``gpu``): equality with
per-table lookups and with ``torch.nn.functional.embedding_bag``, misses of several tables
resolved from the window and LMDB in one request (one LMDB read transaction), bad input refused.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from streamhps import Config, Publisher
from streamhps.errors import MissingKeyError, UnknownTableError, ValidationError
from streamhps.store import LmdbStore
from streamhps.store.base import WriteBatch
from streamhps.worker import InferenceWorker

pytestmark = pytest.mark.integration

TABLES = {
    "user": (8, "float32", "error"),
    "item": (16, "float32", "zeros"),
    "tag": (8, "float16", "init:5"),
}


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def rows_of(keys: np.ndarray, version: int, dim: int, dtype: str = "float32") -> np.ndarray:
    """Rows that say what they are: column 0 = version, column 1 = key % 1000, then noise."""
    v = np.random.default_rng(int(keys.sum() % 1000) + version).standard_normal((keys.size, dim))
    v[:, 0] = version
    v[:, 1] = keys % 1000
    return v.astype(dtype)


def make_config(tmp: Path, bootstrap: str, **serving: Any) -> Config:
    lines = [
        f'topic_prefix = "r{uuid.uuid4().hex[:10]}"',
        "[kafka]",
        f'"bootstrap.servers" = "{bootstrap}"',
    ]
    for name, (dim, dtype, missing) in TABLES.items():
        lines += ["[[tables]]", f'name = "{name}"', f"dim = {dim}", f'dtype = "{dtype}"',
                  "partitions = 2", f'missing = "{missing}"', "insert_on_update = false"]  # fmt: skip
    opts = {"max_staleness_s": 5.0, "cache_capacity": 1 << 14, "warm_from_store": False,
            "max_lookup_keys": 50_000, **serving}  # fmt: skip
    lines.append("[serving]")
    lines += [f"{k} = {str(v).lower() if isinstance(v, bool) else v}" for k, v in opts.items()]
    path = tmp / "c.toml"
    path.write_text("\n".join(lines) + "\n")
    return Config.load(path)


def write_store(
    cfg: Config, path: Path, rows: dict[str, tuple[np.ndarray, np.ndarray, int]]
) -> Path:
    """An LMDB store holding ``rows`` (table -> keys, vectors, version), as a processor leaves it."""
    with LmdbStore.open(path, readonly=False) as st:
        st.ensure_tables({t.name: t for t in cfg.tables})
        batch = WriteBatch()
        for table, (k, v, version) in rows.items():
            batch.table_rows(table).add(k, v, np.full(k.size, version, np.int64))
        st.write_batch(batch)
    return path


@pytest.fixture
def world(bootstrap: str, tmp_path: Path, device: str) -> Iterator[dict[str, Any]]:
    """LMDB holds version 1 of some rows; the stream carries version 2 of others (and of a part
    of the stored ones); the worker's caches start cold (no warm-up, no insert on update)."""
    cfg = make_config(tmp_path, bootstrap)
    stored = {
        "user": np.arange(0, 600, dtype=np.int64) * 3,
        "item": np.arange(0, 400, dtype=np.int64) * 5 + 1,
        "tag": np.arange(0, 300, dtype=np.int64) + 10_000,
    }
    streamed = {
        "user": np.concatenate([stored["user"][:200], np.arange(5000, 5300, dtype=np.int64)]),
        "item": np.arange(7000, 7100, dtype=np.int64),
        "tag": stored["tag"][:50],
    }
    store = write_store(
        cfg,
        tmp_path / "store",
        {t: (k, rows_of(k, 1, TABLES[t][0], TABLES[t][1]), 1) for t, k in stored.items()},
    )
    with Publisher.from_config(cfg) as pub:
        pub.create_topics()
        for t, k in streamed.items():
            pub.publish(t, k, rows_of(k, 2, TABLES[t][0], TABLES[t][1]), 2)
        pub.commit(2)
    w = InferenceWorker(cfg, store, device=device).start()
    try:
        w.wait_ready(60)
        deadline = time.monotonic() + 30
        while any(
            p["applied_version"] != 2 for parts in w.staleness().values() for p in parts.values()
        ):
            assert time.monotonic() < deadline, "the worker never consumed version 2"
            time.sleep(0.01)
        yield {"worker": w, "stored": stored, "streamed": streamed, "config": cfg}
    finally:
        w.stop()


def host(a: Any) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a.get()) if hasattr(a, "__cuda_array_interface__") else np.asarray(a)


def expected(world: dict[str, Any], table: str, keys: np.ndarray) -> np.ndarray:
    """What every tier together must answer: the streamed version 2 over the stored version 1."""
    dim, dtype, _ = TABLES[table]
    out = np.zeros((keys.size, dim), dtype=dtype)
    for version, src in ((1, world["stored"][table]), (2, world["streamed"][table])):
        pos = np.searchsorted(src, keys)
        pos = np.minimum(pos, src.size - 1)
        found = src[pos] == keys
        out[found] = rows_of(src, version, dim, dtype)[pos[found]]
    return out


def test_lookup_many_resolves_misses_of_every_table_in_one_store_read(world) -> None:  # type: ignore[no-untyped-def]
    w: InferenceWorker = world["worker"]
    rng = np.random.default_rng(0)
    req = {
        t: rng.permutation(np.concatenate([world["stored"][t], world["streamed"][t]]))[:500]
        for t in TABLES
    }
    req["user"] = np.concatenate([req["user"], req["user"][:40]])  # repeated keys
    calls: list[list[str]] = []
    real = w._store.get_many
    w._store.get_many = lambda keys: calls.append(sorted(keys)) or real(keys)  # type: ignore[method-assign]
    w._store.get = None  # type: ignore[method-assign]  # the miss path must not read per table
    before = dict(w.stats()["lookups"])
    got = w.lookup_many(req)
    assert calls == [sorted(TABLES)]  # ONE read transaction for the three tables' misses
    for t in TABLES:
        if w.device == "cpu":
            assert isinstance(got[t], np.ndarray)
        else:
            assert isinstance(got[t], torch.Tensor) and got[t].device.type == "cuda"
        assert host(got[t]).dtype == np.dtype(TABLES[t][1])
        np.testing.assert_array_equal(
            host(got[t]),
            expected(world, t, np.unique(req[t]))[np.searchsorted(np.unique(req[t]), req[t])],
        )
    s = w.stats()["lookups"]
    n = sum(k.size for k in req.values())
    assert s["keys"] - before["keys"] == n and s["misses"] - before["misses"] == n  # cold caches
    assert s["from_window"] > before["from_window"] and s["from_store"] > before["from_store"]
    assert s["window_over_store"] - before["window_over_store"] >= 1
    # the fills land: the same request then hits everywhere, without reading the store
    deadline = time.monotonic() + 10
    while sum(w.stats()["tables"][t]["cache"]["size"] for t in TABLES) < sum(
        np.unique(k).size for k in req.values()
    ):
        assert time.monotonic() < deadline, "fills never reached the caches"
        time.sleep(0.01)
    calls.clear()
    again = w.lookup_many(req)
    assert calls == []
    for t in TABLES:
        np.testing.assert_array_equal(host(again[t]), host(got[t]))


def test_lookup_many_equals_per_table_lookups_for_every_key_type(world) -> None:  # type: ignore[no-untyped-def]
    w: InferenceWorker = world["worker"]
    keys = {
        t: np.concatenate([world["stored"][t][:100], world["streamed"][t][-30:]]) for t in TABLES
    }
    want = {t: w.lookup(t, k) for t, k in keys.items()}
    forms: list[dict[str, Any]] = [
        keys,
        {t: torch.from_numpy(k) for t, k in keys.items()},
        {t: k.astype(np.int32) for t, k in keys.items()},
        {t: k.tolist() for t, k in keys.items()},
        {t: k.astype(np.uint64) for t, k in keys.items()},
    ]
    if w.device != "cpu":
        import cupy

        forms.append({t: cupy.asarray(k) for t, k in keys.items()})
        forms.append({t: torch.from_numpy(k).cuda() for t, k in keys.items()})
        forms.append({t: torch.from_numpy(k).cuda().to(torch.int32) for t, k in keys.items()})
    for form in forms:
        got = w.lookup_many(form)
        assert list(got) == list(keys)
        for t in TABLES:
            np.testing.assert_array_equal(host(got[t]), want[t])
    one = w.lookup_many({"item": keys["item"]})
    np.testing.assert_array_equal(host(one["item"]), want["item"])
    assert w.lookup_many({}) == {}
    empty = w.lookup_many({"user": np.zeros(0, np.int64), "item": keys["item"][:3]})
    assert tuple(empty["user"].shape) == (0, 8) and tuple(empty["item"].shape) == (3, 16)


def test_lookup_many_refuses_bad_input_with_clear_errors(world) -> None:  # type: ignore[no-untyped-def]
    w: InferenceWorker = world["worker"]
    k = world["stored"]["user"][:4]
    with pytest.raises(UnknownTableError, match="unknown table 'nope'"):
        w.lookup_many({"user": k, "nope": k})
    with pytest.raises(ValidationError, match="keys of table 'item' must be integers"):
        w.lookup_many({"user": k, "item": k.astype(np.float32)})
    with pytest.raises(ValidationError, match="keys of table 'user' must be integers"):
        w.lookup_many({"user": torch.tensor([1.0, 2.0])})
    with pytest.raises(ValidationError, match="keys of table 'user' must be integers"):
        w.lookup_many({"user": np.array([True, False])})
    with pytest.raises(ValidationError, match="1-D"):
        w.lookup_many({"user": k.reshape(2, 2)})
    with pytest.raises(
        ValidationError, match="keys of table 'user' are on meta, but this worker serves on"
    ):
        w.lookup_many({"user": torch.zeros(3, dtype=torch.int64, device="meta")})
    with pytest.raises(ValidationError, match="mapping of table name"):
        w.lookup_many([("user", k)])  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="max_lookup_keys"):
        w.lookup_many({"user": np.zeros(50_001, np.int64)})
    with pytest.raises(ValidationError, match="consistency"):
        w.lookup_many({"user": k}, consistency="strong")
    with pytest.raises(MissingKeyError, match="table 'user': 1 key"):
        w.lookup_many({"item": np.array([123_456]), "user": np.array([k[0], 999_999_999])})
    # the tables whose policy serves a default still got their fills queued; nothing broke
    got = w.lookup_many({"item": np.array([123_456]), "tag": np.array([99_999_999])})
    assert not host(got["item"]).any()  # missing = zeros
    assert host(got["tag"]).any()  # missing = init:5
    if w.device != "cpu" and torch.cuda.device_count() > 1:
        with pytest.raises(ValidationError, match="are on cuda:1"):
            w.lookup_many({"user": torch.from_numpy(k).to("cuda:1")})


def _bags(rng: np.random.Generator, n_bags: int, pool: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lengths = rng.integers(0, 40, n_bags)
    lengths[::7] = 0  # empty bags
    keys = rng.choice(pool, int(lengths.sum()))
    return keys, lengths


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_pooled_lookup_equals_embedding_bag(world, mode: str) -> None:  # type: ignore[no-untyped-def]
    w: InferenceWorker = world["worker"]
    rng = np.random.default_rng(1)
    for table in ("user", "tag"):
        pool = np.concatenate([world["stored"][table], world["streamed"][table]])
        keys, lengths = _bags(rng, 300, pool)
        offsets = np.concatenate(([0], np.cumsum(lengths)[:-1]))
        uniq, inv = np.unique(keys, return_inverse=True)
        weight = torch.from_numpy(expected(world, table, uniq).astype(np.float32))
        want = torch.nn.functional.embedding_bag(
            torch.from_numpy(inv), weight, torch.from_numpy(offsets), mode=mode
        ).numpy()
        tol = (
            {"rtol": 1e-5, "atol": 1e-5}
            if TABLES[table][1] == "float32"
            else {"rtol": 2e-3, "atol": 2e-2}
        )
        # cold cache: every row missed, resolved from the window and LMDB, added in
        got = w.lookup_pooled(table, keys, offsets=offsets, mode=mode)
        np.testing.assert_allclose(host(got).astype(np.float32), want, **tol)
        # the lengths form, the include_last_offset form, torch inputs; now partly resident
        deadline = time.monotonic() + 10
        while w.stats()["tables"][table]["cache"]["size"] < uniq.size:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        for kw in (
            {"lengths": lengths},
            {"offsets": np.concatenate((offsets, [keys.size])), "include_last_offset": True},
            {"offsets": torch.from_numpy(offsets)},
        ):
            got = w.lookup_pooled(table, torch.from_numpy(keys), mode=mode, **kw)
            np.testing.assert_allclose(host(got).astype(np.float32), want, **tol)
        if w.device != "cpu":
            assert isinstance(got, torch.Tensor) and got.is_cuda
            got = w.lookup_pooled(
                table,
                torch.from_numpy(keys).cuda(),
                offsets=torch.from_numpy(offsets).cuda(),
                mode=mode,
            )
            np.testing.assert_allclose(host(got).astype(np.float32), want, **tol)
        assert host(got).dtype == np.dtype(TABLES[table][1])


def test_pooled_lookup_refuses_bad_bags(world) -> None:  # type: ignore[no-untyped-def]
    w: InferenceWorker = world["worker"]
    k = world["stored"]["user"][:6]
    with pytest.raises(ValidationError, match="offsets must start at 0"):
        w.lookup_pooled("user", k, offsets=np.array([1, 3]))
    with pytest.raises(ValidationError, match="without going back"):
        w.lookup_pooled("user", k, offsets=np.array([0, 4, 2]))
    with pytest.raises(ValidationError, match="rise to the number of keys"):
        w.lookup_pooled("user", k, offsets=np.array([0, 2, 9]))
    with pytest.raises(ValidationError, match="sum to the number of keys"):
        w.lookup_pooled("user", k, lengths=np.array([2, 2]))
    with pytest.raises(ValidationError, match="not both"):
        w.lookup_pooled("user", k, offsets=np.array([0]), lengths=np.array([6]))
    with pytest.raises(ValidationError, match="not both"):
        w.lookup_pooled("user", k)
    with pytest.raises(ValidationError, match="mode"):
        w.lookup_pooled("user", k, lengths=np.array([6]), mode="max")
    with pytest.raises(ValidationError, match="integer"):
        w.lookup_pooled("user", k, offsets=np.array([0.0, 3.0]))
    with pytest.raises(UnknownTableError):
        w.lookup_pooled("nope", k, lengths=np.array([6]))
    out = w.lookup_pooled("user", np.zeros(0, np.int64), offsets=np.zeros(0, np.int64))
    assert tuple(out.shape) == (0, 8)


def test_streaming_embedding_modules_inside_a_users_model(world) -> None:  # type: ignore[no-untyped-def]
    from streamhps.models import StreamingEmbedding, StreamingEmbeddingBag, StreamingEmbeddings

    w: InferenceWorker = world["worker"]
    dev = torch.device(w.torch_device)
    keys = np.concatenate([world["stored"]["user"][:30], world["streamed"]["user"][-18:]])

    class UserModel(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.user = StreamingEmbedding(w, "user")
            self.tags = StreamingEmbeddingBag(w, "tag", mode="mean")
            self.head = torch.nn.Linear(16, 1).to(dev)

        def forward(
            self, users: torch.Tensor, tags: torch.Tensor, offs: torch.Tensor
        ) -> torch.Tensor:
            x = torch.cat([self.user(users), self.tags(tags, offs).float()], dim=1)
            return self.head(x).squeeze(1)

    m = UserModel()
    assert set(m.state_dict()) == {"head.weight", "head.bias"}  # the stream is the tables' state
    grid = torch.from_numpy(keys.reshape(6, 8))
    got = m.user(grid)
    assert got.shape == (6, 8, 8) and got.device == dev and not got.requires_grad
    np.testing.assert_array_equal(host(got).reshape(48, 8), w.lookup("user", keys))
    tag_keys = torch.from_numpy(np.repeat(world["stored"]["tag"][:12], 2))
    offs = torch.tensor([0, 4, 4, 10])
    out = m(torch.from_numpy(keys[:4]), tag_keys, offs)
    assert out.shape == (4,) and out.device == dev
    out.sum().backward()  # the user's own parameters train; the streamed rows carry no grad
    assert m.head.weight.grad is not None
    equal_bags = m.tags(tag_keys.reshape(4, 6))
    want = host(w.lookup_pooled("tag", tag_keys, lengths=[6, 6, 6, 6], mode="mean"))
    np.testing.assert_array_equal(host(equal_bags), want)
    both = StreamingEmbeddings(w, ["user", "item"])
    got2 = both(
        {"user": torch.from_numpy(keys), "item": torch.from_numpy(world["stored"]["item"][:5])}
    )
    np.testing.assert_array_equal(host(got2["user"]), w.lookup("user", keys))
    assert tuple(got2["item"].shape) == (5, 16)
    with pytest.raises(KeyError, match="not in this module"):
        both({"tag": torch.tensor([1])})
