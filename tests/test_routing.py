"""Routing by placement: each key to exactly one shard, the one serving its partition."""

from __future__ import annotations

import threading
from collections.abc import Mapping

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from streamhps.client import ShardedClient, decode_rows, encode_layout
from streamhps.config import Config
from streamhps.partitioning import partition_of
from streamhps.placement import plan

KEYS = st.lists(st.integers(-(2**63), 2**63 - 1), max_size=300)


class EchoShards(ShardedClient):
    """A ShardedClient whose shards answer locally: row = [position in the request, shard]; it
    records the keys each shard got."""

    def __init__(self, *a, **kw) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*a, **kw)
        self.got: list[tuple[int, str, np.ndarray]] = []
        self._lock = threading.Lock()

    def _ask(  # type: ignore[override]
        self, shard: int, req: Mapping[str, tuple[np.ndarray, np.ndarray]], consistency: str
    ) -> dict[str, np.ndarray]:
        out = {}
        for table, (idx, keys) in req.items():
            with self._lock:
                self.got.append((shard, table, keys.copy()))
            rows = np.zeros((keys.shape[0], 2), dtype=np.float32)
            rows[:, 0], rows[:, 1] = idx, shard
            out[table] = rows
        return out


def _config(parts: list[int]) -> Config:
    return Config.from_dict(
        {"tables": [{"name": f"t{i}", "dim": 2, "partitions": n} for i, n in enumerate(parts)]}
    )


@settings(max_examples=60, deadline=None)
@given(
    shards=st.integers(1, 5),
    parts=st.lists(st.integers(1, 24), min_size=1, max_size=3),
    strategy=st.sampled_from(["table", "row", "load"]),
    keys=st.lists(KEYS, min_size=3, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_each_key_goes_to_exactly_the_shard_serving_its_partition(
    shards: int, parts: list[int], strategy: str, keys: list[list[int]], seed: int
) -> None:
    cfg = _config(parts)
    rng = np.random.default_rng(seed)
    trace = {t.name: rng.integers(0, 1000, 200) for t in cfg.tables}
    p = plan(cfg, shards, strategy=strategy, trace=trace if strategy == "load" else None)
    c = EchoShards(p, [f"http://127.0.0.1:{9000 + i}" for i in range(shards)])
    try:
        request = {
            t.name: np.array(k, dtype=np.int64) for t, k in zip(cfg.tables, keys, strict=False)
        }
        for name, k in request.items():
            split = c.split(name, k)
            positions = np.concatenate([*split.values(), np.zeros(0, np.int64)])
            assert sorted(positions.tolist()) == list(range(k.size))  # each key exactly once
            n = cfg.table(name).partitions
            for s, idx in split.items():
                for part in partition_of(k[idx], n).tolist():
                    assert part in p.partitions_of(s)[name]
        got = c.lookup_many(request)
        for name, k in request.items():  # merged back in request order, from the owner
            assert got[name][:, 0].tolist() == list(range(k.size))
            assert got[name][:, 1].tolist() == p.owner(name, k).tolist()
        shards_asked = {s for s, _, _ in c.got}
        assert len(c.got) == sum(len(c.split(n, k)) for n, k in request.items())
        for s, name, k in c.got:  # a shard only ever sees keys it serves
            assert (p.owner(name, k) == s).all()
        assert c.counters["shard_requests"] == len(shards_asked)
    finally:
        c.close()


def test_layout_round_trip() -> None:
    rows = {
        "a": np.arange(12, dtype=np.float32).reshape(4, 3),
        "b": np.arange(10, dtype=np.float16).reshape(2, 5),
        "c": np.zeros((0, 7), dtype=np.float32),
    }
    body = b"".join(a.tobytes() for a in rows.values())
    back = decode_rows(encode_layout(rows), body)
    assert list(back) == list(rows)
    for k, a in rows.items():
        np.testing.assert_array_equal(back[k], a)
        assert back[k].dtype == a.dtype
