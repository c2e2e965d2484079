"""Which sparse shard serves which partitions of which table: placement plans.

::

    from streamhps.placement import plan, Placement, load_trace
    p = plan(config, shards=4, strategy="load", trace=load_trace("keys.npz"), capacity_bytes=8 << 30)
    p.save("placement.json")
    p = Placement.load("placement.json"); p.check(config)
    p.partitions_of(2)            # {"user": (1, 5), "item": (0, 3, 6)}: what shard 2 serves
    p.owner("user", keys)         # shard of each key (int64 array)

The unit of placement is one Kafka partition of one table (``partition_of(key, n)``, the same
function publisher, processor and worker use), so a sparse shard is a set of partitions it tails
and answers for. Three strategies, after "Understanding Capacity-Driven Scale-Out Neural
Recommendation Inference" (Lui et al.):

* ``table``: whole tables, largest first, each onto the shard with the least memory so far
  (capacity-balanced table-wise). A table larger than one shard's capacity cannot be placed.
* ``row``: every table split by partition, partition ``p`` on shard ``p % N`` (the processor's
  ``--shard I/N`` rule, so with N processors each sparse shard reads exactly one store).
* ``load``: partitions packed by measured access frequency (a key trace is required): longest
  processing time first onto the least-loaded shard that still has room, then moves and swaps
  that lower the busiest shard. Balances lookups within the capacity limit.

Sizes. A shard's cache of table T holds ``ceil(rows_T * headroom * k / P_T)`` rows for its ``k``
of ``P_T`` partitions (keys hash evenly over partitions); ``headroom`` (default 1.25) leaves room
in the 32-slot buckets of the set-associative cache, which drop rows of a full bucket (they are
then read from LMDB: exact, slower). Memory = ``memory_estimate`` of those caches (the cache only:
windows and LMDB pages are not counted). ``rows_T`` comes from ``rows=`` (``--rows T=N``), else
the trace's distinct keys of T, else ``serving.cache_capacity`` (one worker's cache per table).

Lookups. With a trace, a partition's load is the number of trace entries that fall in it; without
one, every table gets the same number of lookups (one id per example per table, as the predict
API sends), spread evenly over its partitions. ``imbalance`` = max / mean lookups over shards.

The file (JSON) is described in ``schemas/PLACEMENT.md`` and ``schemas/placement.schema.json``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from streamhps.cache.base import memory_estimate
from streamhps.config import Config
from streamhps.errors import ConfigError, PlacementError
from streamhps.partitioning import partition_of

FORMAT = 1
KIND = "streamhps-placement"
STRATEGIES = ("table", "row", "load")
GIB = float(1 << 30)


@dataclass(frozen=True)
class TableInfo:
    """What the plan assumed about one table."""

    dim: int
    dtype: str
    partitions: int
    rows: int
    rows_source: str  # "rows" (given), "trace" (distinct keys), "cache_capacity"


@dataclass(frozen=True)
class ShardPlan:
    """One sparse shard: the partitions it serves, its cache sizes, memory and lookup share."""

    shard: int
    partitions: dict[str, tuple[int, ...]]
    cache_rows: dict[str, int]
    memory_bytes: int
    lookup_share: float


@dataclass(frozen=True)
class Placement:
    """A placement plan: every partition of every table on exactly one shard."""

    strategy: str
    tables: dict[str, TableInfo]
    shards: tuple[ShardPlan, ...]
    backend: str = "cuda"
    capacity_bytes: int | None = None
    headroom: float = 1.25
    topic_prefix: str = ""
    lookup_source: str = "uniform"  # "trace" | "uniform"
    trace_lookups: dict[str, int] | None = None
    _owners: dict[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise PlacementError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if [s.shard for s in self.shards] != list(range(len(self.shards))) or not self.shards:
            raise PlacementError(
                f"shards must be numbered 0..N-1 in order, got {[s.shard for s in self.shards]}"
            )
        for name, t in self.tables.items():
            owner = np.full(t.partitions, -1, dtype=np.int64)
            for s in self.shards:
                for p in s.partitions.get(name, ()):
                    if not 0 <= p < t.partitions:
                        raise PlacementError(
                            f"shard {s.shard}: table {name!r} has no partition {p} "
                            f"(it has {t.partitions})"
                        )
                    if owner[p] >= 0:
                        raise PlacementError(
                            f"table {name!r} partition {p} is on shard {owner[p]} and shard {s.shard}"
                        )
                    owner[p] = s.shard
            unplaced = np.flatnonzero(owner < 0)
            if unplaced.size:
                raise PlacementError(
                    f"table {name!r} partitions {unplaced.tolist()} are on no shard"
                )
            self._owners[name] = owner
        for s in self.shards:
            extra = sorted(set(s.partitions) - set(self.tables))
            if extra:
                raise PlacementError(f"shard {s.shard} lists unknown table(s) {extra}")

    # ------------------------------------------------------------------ queries

    @property
    def n_shards(self) -> int:
        return len(self.shards)

    def partitions_of(self, shard: int) -> dict[str, tuple[int, ...]]:
        """Table -> partitions shard ``shard`` serves (tables it serves nothing of are absent)."""
        return {t: ps for t, ps in self._shard(shard).partitions.items() if ps}

    def cache_rows(self, shard: int) -> dict[str, int]:
        """Table -> rows the shard's cache of that table should hold."""
        return dict(self._shard(shard).cache_rows)

    def owner_of_partitions(self, table: str) -> np.ndarray:
        """``owner[p]`` = the shard that serves partition ``p`` of ``table``."""
        try:
            return self._owners[table]
        except KeyError:
            raise PlacementError(
                f"table {table!r} is not in the placement; it places {sorted(self.tables)}"
            ) from None

    def owner(self, table: str, keys: Any) -> np.ndarray:
        """The shard that serves each key (int64 array, same length as ``keys``)."""
        owners = self.owner_of_partitions(table)
        return owners[partition_of(np.asarray(keys), owners.shape[0])]

    @property
    def imbalance(self) -> float:
        """Max / mean lookup share over shards (1.0 is perfect)."""
        shares = [s.lookup_share for s in self.shards]
        mean = sum(shares) / len(shares)
        return max(shares) / mean if mean > 0 else 1.0

    @property
    def memory_imbalance(self) -> float:
        mem = [s.memory_bytes for s in self.shards]
        mean = sum(mem) / len(mem)
        return max(mem) / mean if mean > 0 else 1.0

    def check(self, config: Config) -> None:
        """Refuse a placement made for other tables (names, partitions, dim, dtype)."""
        have = {t.name: t for t in config.tables}
        if set(have) != set(self.tables):
            raise ConfigError(
                f"placement is for tables {sorted(self.tables)} but the config has {sorted(have)}; "
                "run `streamhps plan` again for this config"
            )
        for name, t in self.tables.items():
            c = have[name]
            if (c.partitions, c.dim, c.dtype) != (t.partitions, t.dim, t.dtype):
                raise ConfigError(
                    f"placement table {name!r}: partitions={t.partitions} dim={t.dim} dtype={t.dtype}, "
                    f"but the config says partitions={c.partitions} dim={c.dim} dtype={c.dtype}; "
                    "run `streamhps plan` again"
                )

    def _shard(self, shard: int) -> ShardPlan:
        if not 0 <= shard < len(self.shards):
            raise PlacementError(
                f"shard {shard} is not in the placement (shards 0..{len(self.shards) - 1})"
            )
        return self.shards[shard]

    # ------------------------------------------------------------------ file

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": KIND,
            "format": FORMAT,
            "strategy": self.strategy,
            "shards": len(self.shards),
            "backend": self.backend,
            "capacity_bytes": self.capacity_bytes,
            "headroom": self.headroom,
            "topic_prefix": self.topic_prefix,
            "lookup_source": self.lookup_source,
            "trace_lookups": self.trace_lookups,
            "tables": {
                n: {
                    "dim": t.dim,
                    "dtype": t.dtype,
                    "partitions": t.partitions,
                    "rows": t.rows,
                    "rows_source": t.rows_source,
                }
                for n, t in self.tables.items()
            },
            "placement": [
                {
                    "shard": s.shard,
                    "partitions": {t: list(ps) for t, ps in s.partitions.items()},
                    "cache_rows": dict(s.cache_rows),
                    "memory_bytes": s.memory_bytes,
                    "lookup_share": round(s.lookup_share, 9),
                }
                for s in self.shards
            ],
            "imbalance": {
                "lookups": round(self.imbalance, 6),
                "memory": round(self.memory_imbalance, 6),
            },
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def save(self, path: str | os.PathLike[str]) -> Path:
        p = Path(path)
        p.write_text(self.to_json())
        return p

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str = "placement") -> Placement:
        try:
            if d.get("kind") != KIND:
                raise PlacementError(
                    f"{source} is not a streamhps placement (kind {d.get('kind')!r})"
                )
            if d.get("format") != FORMAT:
                raise PlacementError(
                    f"{source} has placement format {d.get('format')!r}; this build reads {FORMAT}"
                )
            tables = {
                str(n): TableInfo(int(t["dim"]), str(t["dtype"]), int(t["partitions"]),
                                  int(t["rows"]), str(t.get("rows_source", "rows")))
                for n, t in d["tables"].items()
            }  # fmt: skip
            shards = tuple(
                ShardPlan(
                    int(s["shard"]),
                    {str(t): tuple(int(p) for p in ps) for t, ps in s["partitions"].items()},
                    {str(t): int(r) for t, r in s.get("cache_rows", {}).items()},
                    int(s["memory_bytes"]),
                    float(s["lookup_share"]),
                )
                for s in d["placement"]
            )
            if len(shards) != int(d["shards"]):
                raise PlacementError(
                    f"{source}: 'shards' says {d['shards']} but 'placement' lists {len(shards)}"
                )
            cap = d.get("capacity_bytes")
            return cls(
                strategy=str(d["strategy"]),
                tables=tables,
                shards=shards,
                backend=str(d.get("backend", "cuda")),
                capacity_bytes=None if cap is None else int(cap),
                headroom=float(d.get("headroom", 1.25)),
                topic_prefix=str(d.get("topic_prefix", "")),
                lookup_source=str(d.get("lookup_source", "uniform")),
                trace_lookups=d.get("trace_lookups"),
            )
        except PlacementError as e:
            if str(e).startswith(source):
                raise
            raise PlacementError(f"{source}: {e}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise PlacementError(f"{source} is not a valid placement file: {e!r}") from None

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Placement:
        p = Path(path)
        try:
            data = json.loads(p.read_text())
        except OSError as e:
            raise PlacementError(f"cannot read placement {p}: {e.strerror}") from None
        except ValueError as e:
            raise PlacementError(f"placement {p} is not valid JSON: {e}") from None
        return cls.from_dict(data, source=str(p))


# ---------------------------------------------------------------------- traces


def load_trace(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """A key trace: an ``.npz`` with one int64 array per table name, one entry per lookup
    (multi-hot ids flattened; repeats are what makes a key hot)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {name: np.asarray(z[name]) for name in z.files}
    except (OSError, ValueError) as e:
        raise PlacementError(f"cannot read key trace {path}: {e}") from None
    for name, a in out.items():
        if a.ndim != 1 or (a.size and a.dtype.kind not in "iu"):
            raise PlacementError(
                f"key trace {path}: array {name!r} must be 1-D integer keys, got {a.dtype} {a.shape}"
            )
    return out


def zipf_trace(
    config: Config,
    lookups: Mapping[str, int],
    *,
    rows: Mapping[str, int],
    alpha: float = 1.05,
    seed: int = 0,
    id_seed: int = 0,
) -> dict[str, np.ndarray]:
    """A synthetic trace: per table ``lookups[t]`` keys drawn Zipf(``alpha``) over ``rows[t]``
    ids ``0..rows-1``. Rank ``r`` maps to a scrambled id (fixed by ``id_seed``, so traces drawn
    with other ``seed``s share their hot keys), so hot keys land in arbitrary partitions."""
    rng = np.random.default_rng(seed)
    out = {}
    for i, t in enumerate(config.tables):
        n = int(rows[t.name])
        p = np.arange(1, n + 1, dtype=np.float64) ** -alpha
        p /= p.sum()
        ranks = rng.choice(n, size=int(lookups[t.name]), p=p)
        ids = np.random.default_rng([id_seed, i]).permutation(n).astype(np.int64)
        out[t.name] = ids[ranks]
    return out


# ---------------------------------------------------------------------- planning


@dataclass
class _Item:
    table: str
    partition: int
    load: float
    rows: float  # rows of this partition (before headroom)


def plan(
    config: Config,
    shards: int,
    *,
    strategy: str = "row",
    capacity_bytes: int | None = None,
    trace: Mapping[str, np.ndarray] | None = None,
    rows: Mapping[str, int] | None = None,
    backend: str = "cuda",
    headroom: float = 1.25,
) -> Placement:
    """Place every partition of every table of ``config`` on one of ``shards`` sparse shards.

    Raises :class:`PlacementError` when the plan does not fit ``capacity_bytes`` per shard,
    saying by how much (and how many shards would be needed where that is the reason).
    """
    if strategy not in STRATEGIES:
        raise PlacementError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise PlacementError(f"shards must be a positive integer, got {shards!r}")
    if capacity_bytes is not None and capacity_bytes <= 0:
        raise PlacementError(f"capacity must be > 0 bytes, got {capacity_bytes}")
    if not headroom >= 1.0:
        raise PlacementError(f"headroom must be >= 1.0, got {headroom}")
    if strategy == "load" and trace is None:
        raise PlacementError(
            "load-balanced placement packs partitions by measured access frequency: give a key "
            "trace (--trace keys.npz)"
        )
    specs = {t.name: t for t in config.tables}
    unknown = sorted(set(rows or {}) - set(specs)) + sorted(set(trace or {}) - set(specs))
    if unknown:
        raise PlacementError(f"unknown table(s) {unknown}; the config has {sorted(specs)}")

    tables: dict[str, TableInfo] = {}
    items: list[_Item] = []
    trace_lookups: dict[str, int] | None = None
    if trace is not None:
        trace_lookups = {n: int(np.asarray(trace.get(n, ())).size) for n in specs}
    for name, spec in specs.items():
        if rows and name in rows:
            n_rows, src = int(rows[name]), "rows"
        elif trace is not None and name in trace and np.asarray(trace[name]).size:
            n_rows, src = int(np.unique(np.asarray(trace[name])).size), "trace"
        else:
            n_rows, src = int(config.serving.cache_capacity), "cache_capacity"
        if n_rows < 1:
            raise PlacementError(f"table {name!r}: rows must be >= 1, got {n_rows}")
        tables[name] = TableInfo(spec.dim, spec.dtype, spec.partitions, n_rows, src)
        if trace is not None:
            keys = np.asarray(trace.get(name, np.zeros(0, np.int64)))
            load = np.bincount(partition_of(keys, spec.partitions), minlength=spec.partitions)
            load = load.astype(np.float64)
        else:
            load = np.full(spec.partitions, 1.0 / spec.partitions)
        for p in range(spec.partitions):
            items.append(_Item(name, p, float(load[p]), n_rows / spec.partitions))
    total_load = sum(i.load for i in items) or 1.0

    def shard_memory(assigned: Mapping[str, int]) -> tuple[int, dict[str, int]]:
        cache: dict[str, int] = {}
        mem = 0
        for t, k in assigned.items():
            if k:
                info = tables[t]
                cache[t] = math.ceil(info.rows * headroom * k / info.partitions)
                mem += memory_estimate(cache[t], info.dim, info.dtype, backend)
        return mem, cache

    _check_total(tables, shards, capacity_bytes, headroom, backend)
    if strategy == "table":
        assignment = _table_wise(tables, items, shards, capacity_bytes, shard_memory)
    elif strategy == "row":
        assignment = [[i for i in items if i.partition % shards == s] for s in range(shards)]
    else:
        assignment = _load_balanced(items, shards, capacity_bytes, shard_memory)

    plans = []
    for s, its in enumerate(assignment):
        parts: dict[str, list[int]] = {}
        for i in its:
            parts.setdefault(i.table, []).append(i.partition)
        mem, cache = shard_memory({t: len(ps) for t, ps in parts.items()})
        plans.append(
            ShardPlan(
                s,
                {t: tuple(sorted(ps)) for t, ps in sorted(parts.items())},
                cache,
                mem,
                sum(i.load for i in its) / total_load,
            )
        )
    if capacity_bytes is not None:
        over = [p for p in plans if p.memory_bytes > capacity_bytes]
        if over:
            worst = max(over, key=lambda p: p.memory_bytes)
            raise PlacementError(
                f"{strategy}-wise placement over {shards} shards does not fit: shard {worst.shard} "
                f"needs {worst.memory_bytes / GIB:.3f} GiB, over the {capacity_bytes / GIB:.3f} GiB "
                f"capacity by {(worst.memory_bytes - capacity_bytes) / GIB:.3f} GiB "
                f"({len(over)} shard(s) over); use more shards or another strategy"
            )
    return Placement(
        strategy=strategy,
        tables=tables,
        shards=tuple(plans),
        backend=backend,
        capacity_bytes=capacity_bytes,
        headroom=headroom,
        topic_prefix=config.topic_prefix,
        lookup_source="trace" if trace is not None else "uniform",
        trace_lookups=trace_lookups,
    )


def _check_total(
    tables: Mapping[str, TableInfo],
    shards: int,
    capacity: int | None,
    headroom: float,
    backend: str,
) -> None:
    """Refuse early when the whole model does not fit all shards together."""
    if capacity is None:
        return
    need = sum(
        memory_estimate(math.ceil(t.rows * headroom), t.dim, t.dtype, backend)
        for t in tables.values()
    )
    if need > shards * capacity:
        at_least = math.ceil(need / capacity)
        raise PlacementError(
            f"the tables need {need / GIB:.3f} GiB of cache but {shards} shard(s) of "
            f"{capacity / GIB:.3f} GiB hold {shards * capacity / GIB:.3f} GiB: short by "
            f"{(need - shards * capacity) / GIB:.3f} GiB; use at least {at_least} shards "
            "(or more capacity per shard)"
        )


def _table_wise(
    tables: Mapping[str, TableInfo],
    items: Sequence[_Item],
    shards: int,
    capacity: int | None,
    shard_memory: Any,
) -> list[list[_Item]]:
    mem = {n: shard_memory({n: t.partitions})[0] for n, t in tables.items()}
    out: list[list[_Item]] = [[] for _ in range(shards)]
    held: list[dict[str, int]] = [{} for _ in range(shards)]
    used = [0] * shards
    for name in sorted(tables, key=lambda n: (-mem[n], n)):
        if capacity is not None and mem[name] > capacity:
            raise PlacementError(
                f"table-wise placement does not fit: table {name!r} alone needs "
                f"{mem[name] / GIB:.3f} GiB, over the {capacity / GIB:.3f} GiB capacity by "
                f"{(mem[name] - capacity) / GIB:.3f} GiB; use --strategy row or load"
            )
        order = sorted(range(shards), key=lambda s: (used[s], s))
        for s in order:
            after = shard_memory({**held[s], name: tables[name].partitions})[0]
            if capacity is None or after <= capacity:
                break
        else:
            assert capacity is not None  # without a capacity the first shard always fits
            s = order[0]
            after = shard_memory({**held[s], name: tables[name].partitions})[0]
            raise PlacementError(
                f"table-wise placement over {shards} shards does not fit: table {name!r} "
                f"({mem[name] / GIB:.3f} GiB) fits on no shard; the emptiest would need "
                f"{after / GIB:.3f} GiB, over the {capacity / GIB:.3f} GiB capacity by "
                f"{(after - capacity) / GIB:.3f} GiB; use more shards or --strategy row or load"
            )
        held[s][name] = tables[name].partitions
        used[s] = after
        out[s].extend(i for i in items if i.table == name)
    return out


def _load_balanced(
    items: Sequence[_Item], shards: int, capacity: int | None, shard_memory: Any
) -> list[list[_Item]]:
    """LPT onto the least-loaded shard with room, then moves/swaps that lower the maximum."""
    out: list[list[_Item]] = [[] for _ in range(shards)]
    counts: list[dict[str, int]] = [{} for _ in range(shards)]
    load = [0.0] * shards

    def fits(s: int, add: _Item | None, drop: _Item | None = None) -> bool:
        if capacity is None:
            return True
        c = dict(counts[s])
        if add is not None:
            c[add.table] = c.get(add.table, 0) + 1
        if drop is not None:
            c[drop.table] -= 1
        return bool(shard_memory(c)[0] <= capacity)

    def put(s: int, i: _Item) -> None:
        out[s].append(i)
        counts[s][i.table] = counts[s].get(i.table, 0) + 1
        load[s] += i.load

    def take(s: int, i: _Item) -> None:
        out[s].remove(i)
        counts[s][i.table] -= 1
        load[s] -= i.load

    for i in sorted(items, key=lambda i: (-i.load, -i.rows, i.table, i.partition)):
        order = sorted(range(shards), key=lambda s: (load[s], s))
        target = next((s for s in order if fits(s, i)), None)
        if target is None:
            mem_after = shard_memory(
                {**counts[order[0]], i.table: counts[order[0]].get(i.table, 0) + 1}
            )[0]
            assert capacity is not None
            raise PlacementError(
                f"load-balanced placement over {shards} shards does not fit: partition "
                f"{i.partition} of table {i.table!r} fits on no shard; the least-loaded would "
                f"need {mem_after / GIB:.3f} GiB, over the {capacity / GIB:.3f} GiB capacity by "
                f"{(mem_after - capacity) / GIB:.3f} GiB; use more shards"
            )
        put(target, i)

    # Local search: move one partition off the busiest shard, or swap a heavier one of it for
    # a lighter one elsewhere, whenever that lowers the busiest shard's load.
    for _ in range(20 * len(items)):
        hi = max(range(shards), key=lambda s: load[s])
        best: tuple[float, Any] | None = None
        for j in range(shards):
            if j == hi:
                continue
            for a in out[hi]:
                new_max = max(load[hi] - a.load, load[j] + a.load)
                if (
                    new_max < load[hi] - 1e-12
                    and fits(j, a)
                    and (best is None or new_max < best[0])
                ):
                    best = (new_max, ("move", a, j, None))
                for b in out[j]:
                    if b.load >= a.load:
                        continue
                    d = a.load - b.load
                    new_max = max(load[hi] - d, load[j] + d)
                    if (
                        new_max < load[hi] - 1e-12
                        and (best is None or new_max < best[0])
                        and fits(j, a, b)
                        and fits(hi, b, a)
                    ):
                        best = (new_max, ("swap", a, j, b))
        if best is None:
            break
        _, (kind, a, j, b) = best
        take(hi, a)
        put(j, a)
        if kind == "swap":
            take(j, b)
            put(hi, b)
    return out
