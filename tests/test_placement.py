"""Placement plans: strategies, capacity refusals, the file format and the ``plan`` command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamhps.cli import main
from streamhps.config import Config
from streamhps.errors import ConfigError, PlacementError
from streamhps.partitioning import partition_of
from streamhps.placement import GIB, Placement, load_trace, plan, zipf_trace

SCHEMA = Path(__file__).resolve().parents[1] / "schemas" / "placement.schema.json"

# Tables of different sizes and different lookups per example (pooling factors), as in DLRM
# workloads: that is what makes whole-table placement unbalanced.
CONFIG = """\
topic_prefix = "plan"
[[tables]]
name = "user"
dim = 64
partitions = 32
[[tables]]
name = "item"
dim = 32
partitions = 32
[[tables]]
name = "query"
dim = 64
partitions = 32
[[tables]]
name = "ad"
dim = 16
partitions = 32
"""
ROWS = {"user": 400_000, "item": 100_000, "query": 50_000, "ad": 10_000}
LOOKUPS = {"user": 50_000, "item": 200_000, "query": 25_000, "ad": 100_000}


@pytest.fixture(scope="module")
def cfg(tmp_path_factory: pytest.TempPathFactory) -> Config:
    p = tmp_path_factory.mktemp("plan") / "c.toml"
    p.write_text(CONFIG)
    return Config.load(p)


@pytest.fixture(scope="module")
def trace(cfg: Config) -> dict[str, np.ndarray]:
    return zipf_trace(cfg, LOOKUPS, rows=ROWS, alpha=1.05, seed=1)


def _validate(doc: dict) -> None:  # type: ignore[type-arg]
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(doc, json.loads(SCHEMA.read_text()))


def _owners(p: Placement, cfg: Config) -> dict[str, list[int]]:
    return {t.name: p.owner_of_partitions(t.name).tolist() for t in cfg.tables}


@pytest.mark.parametrize("strategy", ["table", "row", "load"])
@pytest.mark.parametrize("shards", [1, 2, 3, 4])
def test_every_partition_is_on_exactly_one_shard(
    cfg: Config, trace: dict[str, np.ndarray], strategy: str, shards: int
) -> None:
    p = plan(cfg, shards, strategy=strategy, trace=trace, rows=ROWS)
    for t in cfg.tables:
        seen = [q for s in p.shards for q in s.partitions.get(t.name, ())]
        assert sorted(seen) == list(range(t.partitions)), t.name
    assert abs(sum(s.lookup_share for s in p.shards) - 1.0) < 1e-9
    if strategy == "table":  # whole tables
        for s in p.shards:
            for name, ps in s.partitions.items():
                assert len(ps) == cfg.table(name).partitions
    if strategy == "row":
        for s in p.shards:
            assert all(q % shards == s.shard for ps in s.partitions.values() for q in ps)
    _validate(p.to_dict())


def test_load_balanced_is_within_10_percent_on_zipf_and_table_wise_is_not(
    cfg: Config, trace: dict[str, np.ndarray]
) -> None:
    for n in (2, 4):
        load = plan(cfg, n, strategy="load", trace=trace, rows=ROWS)
        table = plan(cfg, n, strategy="table", trace=trace, rows=ROWS)
        assert load.imbalance <= 1.1, (n, load.imbalance)
        assert table.imbalance > 1.1, (n, table.imbalance)
        # the share is what the trace says
        for s in load.shards:
            hits = sum(
                int(np.isin(partition_of(trace[t], cfg.table(t).partitions), ps).sum())
                for t, ps in s.partitions.items()
            )
            assert s.lookup_share == pytest.approx(hits / sum(LOOKUPS.values()))


def test_memory_comes_from_memory_estimate_of_the_shard_caches(cfg: Config) -> None:
    from streamhps.cache import memory_estimate

    p = plan(cfg, 3, strategy="row", rows=ROWS, headroom=1.25)
    for s in p.shards:
        want = 0
        for name, ps in s.partitions.items():
            t = cfg.table(name)
            rows = -(-ROWS[name] * 125 * len(ps) // (100 * t.partitions))
            assert s.cache_rows[name] == rows
            want += memory_estimate(rows, t.dim, t.dtype, "cuda")
        assert s.memory_bytes == want
    assert p.lookup_source == "uniform"
    assert p.imbalance == pytest.approx(1.0, abs=0.1)


def test_a_plan_that_does_not_fit_is_refused_saying_by_how_much(cfg: Config) -> None:
    whole = plan(cfg, 1, strategy="row", rows=ROWS)
    need = whole.shards[0].memory_bytes
    cap = int(need * 0.6)
    with pytest.raises(PlacementError, match=r"short by [0-9.]+ GiB; use at least 2 shards"):
        plan(cfg, 1, strategy="row", rows=ROWS, capacity_bytes=cap)
    # two shards hold it row-wise, but not table-wise: the user table alone is too big
    two = plan(cfg, 2, strategy="row", rows=ROWS, capacity_bytes=cap)
    assert max(s.memory_bytes for s in two.shards) <= cap
    with pytest.raises(PlacementError, match=r"table 'user' alone needs .* over the .* by"):
        plan(cfg, 2, strategy="table", rows=ROWS, capacity_bytes=int(need * 0.5))
    # a shard over the capacity by a small amount is named with the amount
    tight = max(s.memory_bytes for s in two.shards) - 1
    with pytest.raises(PlacementError, match=r"shard \d needs .* GiB, over the .* by 0\.000 GiB"):
        plan(cfg, 2, strategy="row", rows=ROWS, capacity_bytes=tight)


def test_load_balanced_respects_the_capacity(cfg: Config, trace: dict[str, np.ndarray]) -> None:
    free = plan(cfg, 4, strategy="load", trace=trace, rows=ROWS)
    cap = int(sum(s.memory_bytes for s in free.shards) / 4 * 1.05)
    p = plan(cfg, 4, strategy="load", trace=trace, rows=ROWS, capacity_bytes=cap)
    assert max(s.memory_bytes for s in p.shards) <= cap
    with pytest.raises(PlacementError, match="needs a|give a key trace"):
        plan(cfg, 4, strategy="load", rows=ROWS)


def test_file_round_trip_schema_and_config_check(
    cfg: Config, trace: dict[str, np.ndarray], tmp_path: Path
) -> None:
    p = plan(cfg, 3, strategy="load", trace=trace, rows=ROWS, capacity_bytes=1 << 30)
    path = p.save(tmp_path / "p.json")
    doc = json.loads(path.read_text())
    _validate(doc)
    q = Placement.load(path)
    assert q.to_dict() == doc
    assert _owners(q, cfg) == _owners(p, cfg)
    q.check(cfg)
    keys = np.arange(-5000, 5000, dtype=np.int64)
    for t in cfg.tables:
        owner = q.owner(t.name, keys)
        assert owner.shape == keys.shape
        parts = partition_of(keys, t.partitions)
        for s in range(3):
            assert set(parts[owner == s].tolist()) <= set(q.partitions_of(s).get(t.name, ()))
    # a placement made for other tables is refused by the check
    other = Config.from_dict(
        {"tables": [{"name": t.name, "dim": t.dim, "partitions": 16} for t in cfg.tables]}
    )
    with pytest.raises(ConfigError, match="partitions=32 .* config says partitions=16"):
        q.check(other)
    # broken files say what is wrong
    bad = dict(doc)
    bad["placement"] = [dict(s) for s in doc["placement"]]
    bad["placement"][1]["partitions"] = dict(bad["placement"][1]["partitions"])
    bad["placement"][1]["partitions"]["user"] = [0]
    with pytest.raises(PlacementError, match=r"partition 0 is on shard \d and shard \d"):
        Placement.from_dict(bad)
    with pytest.raises(PlacementError, match="not a streamhps placement"):
        Placement.from_dict({"kind": "x"})


@settings(max_examples=50, deadline=None)
@given(
    shards=st.integers(1, 6),
    parts=st.lists(st.integers(1, 40), min_size=1, max_size=4),
    strategy=st.sampled_from(["table", "row"]),
    keys=st.lists(st.integers(-(2**63), 2**63 - 1), max_size=200),
)
def test_owner_is_the_shard_holding_the_partition_of_the_key(
    shards: int, parts: list[int], strategy: str, keys: list[int]
) -> None:
    cfg = Config.from_dict(
        {"tables": [{"name": f"t{i}", "dim": 4, "partitions": n} for i, n in enumerate(parts)]}
    )
    p = plan(cfg, shards, strategy=strategy, rows={f"t{i}": 1000 for i in range(len(parts))})
    k = np.array(keys, dtype=np.int64)
    for t in cfg.tables:
        owner = p.owner(t.name, k)
        for key, s in zip(k.tolist(), owner.tolist(), strict=True):
            part = int(partition_of(np.array([key]), t.partitions)[0])
            holders = [x.shard for x in p.shards if part in x.partitions.get(t.name, ())]
            assert holders == [s]


def test_plan_command_writes_the_file_and_refuses_what_does_not_fit(
    cfg: Config, trace: dict[str, np.ndarray], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    c = tmp_path / "c.toml"
    c.write_text(CONFIG)
    tr = tmp_path / "keys.npz"
    np.savez(tr, **trace)
    assert set(load_trace(tr)) == set(trace)
    out = tmp_path / "p.json"
    rows = [a for name, n in ROWS.items() for a in ("--rows", f"{name}={n}")]
    args = ["plan", "--config", str(c), "--shards", "4", "--trace", str(tr), *rows]
    assert main([*args, "--out", str(out)]) == 0
    p = Placement.load(out)
    assert p.strategy == "load" and p.n_shards == 4 and p.imbalance <= 1.1
    assert "imbalance" in capsys.readouterr().out
    need = plan(cfg, 1, strategy="row", rows=ROWS).shards[0].memory_bytes
    small = f"{need * 0.2 / GIB:.4f}"
    assert main([*args, "--capacity-gb", small, "--out", str(tmp_path / "q.json")]) == 2
    err = capsys.readouterr().err
    assert "short by" in err and "use at least" in err
    assert not (tmp_path / "q.json").exists()
    assert main(["plan", "--config", str(c), "--shards", "2", "--rows", "user", "--out", "x"]) == 2
