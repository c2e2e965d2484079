"""Which partitions a worker serves: all of them, a placement's shard, or an explicit list.

A sharded worker tails, caches and answers only its partitions; a key of another partition is
refused with :class:`~streamhps.errors.NotOwnedError` naming the shard that serves it (never an
answer from nothing).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from streamhps.config import Config
from streamhps.errors import ConfigError, NotOwnedError, StreamHPSError, UnknownTableError
from streamhps.partitioning import partition_of
from streamhps.placement import Placement


class Ownership:
    """The partitions of each table one worker serves, and the refusals for the others.

    ``placement`` (a :class:`~streamhps.placement.Placement` or its file) and ``shard``: that
    shard's partitions; or ``partitions``: an explicit ``table -> partitions`` mapping; neither:
    every partition of every table.
    """

    def __init__(
        self,
        config: Config,
        placement: Placement | str | os.PathLike[str] | None = None,
        shard: int | None = None,
        partitions: Mapping[str, Sequence[int]] | None = None,
    ) -> None:
        self.config = config
        self.placement, self.shard = load_placement(config, placement, shard, partitions)
        self.owned = self._owned_partitions(partitions)
        self.sharded = any(len(self.owned.get(t.name, ())) < t.partitions for t in config.tables)
        self.masks = {t.name: self.mask(t.name) for t in config.tables}

    def _owned_partitions(
        self, partitions: Mapping[str, Sequence[int]] | None
    ) -> dict[str, list[int]]:
        """Table -> the partitions this worker serves (all of every table unless sharded)."""
        if self.placement is not None:
            assert self.shard is not None
            got = self.placement.partitions_of(self.shard)
            return {t.name: list(got.get(t.name, ())) for t in self.config.tables}
        if partitions is None:
            return {t.name: list(range(t.partitions)) for t in self.config.tables}
        out: dict[str, list[int]] = {}
        for name, ps in partitions.items():
            spec = self.config.table(name)
            bad = sorted(int(p) for p in ps if not 0 <= int(p) < spec.partitions)
            if bad:
                raise ConfigError(
                    f"partitions {bad} of table {name!r} do not exist (it has {spec.partitions})"
                )
            out[name] = sorted({int(p) for p in ps})
        if not any(out.values()):
            raise ConfigError("partitions= gives this worker no partition of any table")
        return {t.name: out.get(t.name, []) for t in self.config.tables}

    def served(self) -> dict[str, list[int]]:
        """Table -> partitions, for the tables this worker serves at least one partition of."""
        return {t: ps for t, ps in self.owned.items() if ps}

    def cache_rows(self, table: str, default: int) -> int | None:
        """The placement's cache size for ``table`` on this shard, None without a placement."""
        if self.placement is None:
            return None
        assert self.shard is not None
        return int(self.placement.cache_rows(self.shard).get(table, default))

    def mask(self, table: str) -> np.ndarray | None:
        """``mask[p]``: this worker serves partition ``p`` of ``table``; None when it serves all."""
        spec = self.config.table(table)
        owned = self.owned.get(table, [])
        if len(owned) == spec.partitions:
            return None
        mask = np.zeros(spec.partitions, dtype=bool)
        mask[owned] = True
        return mask

    def check_keys(self, table: str, partitions: int, keys: Any) -> None:
        """Refuse keys of partitions another shard serves, naming it (never answer from nothing)."""
        mask = self.masks.get(table)
        if mask is None or keys.size == 0:
            return
        if not isinstance(keys, np.ndarray):
            keys = keys.get()  # device keys on a sharded worker: one read to check ownership
        parts = partition_of(keys, partitions)
        bad = np.flatnonzero(~mask[parts])
        if bad.size:
            key, part = int(keys[bad[0]]), int(parts[bad[0]])
            raise NotOwnedError(
                f"table {table!r}: {bad.size} of {keys.size} keys are not served by "
                f"{self.whoami()}; key {key} is in partition {part}, served by "
                f"{self.owner_name(table, part)}. Route lookups by owner (the main shard "
                "or streamhps.client.ShardedClient)"
            )

    def whoami(self) -> str:
        if self.placement is not None:
            return f"shard {self.shard} of {self.placement.n_shards}"
        return "this worker"

    def owner_name(self, table: str, partition: int) -> str:
        if self.placement is not None:
            return f"shard {int(self.placement.owner_of_partitions(table)[partition])}"
        return f"another worker (this one serves partitions {self.owned.get(table, [])})"

    def table_error(self, table: str, served: Sequence[str], started: bool) -> StreamHPSError:
        """Why a running worker has no state for ``table``: another shard's, or unknown."""
        if started and table in self.owned:
            if self.placement is not None:
                owners = sorted(set(self.placement.owner_of_partitions(table).tolist()))
                where = f"shard(s) {owners}"
            else:
                where = "other workers"
            return NotOwnedError(
                f"table {table!r} is not served by {self.whoami()}: {where} serve it"
            )
        if started:
            return UnknownTableError(
                f"unknown table {table!r}; this worker serves {sorted(served)}"
            )
        return StreamHPSError("worker is not running: call start() first")

    def describe(self) -> dict[str, Any]:
        """The ``shard`` section of the worker's stats."""
        return {
            "shard": self.shard,
            "shards": self.placement.n_shards if self.placement is not None else None,
            "partitions": self.served(),
        }


def load_placement(
    config: Config,
    placement: Placement | str | os.PathLike[str] | None,
    shard: int | None,
    partitions: Mapping[str, Sequence[int]] | None,
) -> tuple[Placement | None, int | None]:
    """The placement and shard a worker was given, checked against the config."""
    if placement is None:
        if shard is not None:
            raise ConfigError("shard= needs placement= (the file `streamhps plan` writes)")
        return None, None
    if partitions is not None:
        raise ConfigError("give placement= and shard=, or partitions=, not both")
    p = placement if isinstance(placement, Placement) else Placement.load(placement)
    p.check(config)
    if shard is None or not 0 <= int(shard) < p.n_shards:
        raise ConfigError(
            f"placement has shards 0..{p.n_shards - 1}; give shard= one of them, got {shard!r}"
        )
    if not p.partitions_of(int(shard)):
        raise ConfigError(f"shard {shard} of the placement serves no partition: nothing to do")
    return p, int(shard)
