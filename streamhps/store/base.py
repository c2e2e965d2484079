"""The persistent tier's interface: a reader every process may open, a writer only the processor holds.

A store holds, per table, one row per key (the vector and the version that wrote it), the Kafka
offsets its rows came from ("next offset to consume" per ``(topic, partition)``), and the applied
version of each partition (the last commit marker whose rows it holds). Rows, offsets and markers
of one batch become visible together (one write transaction), so a reader never sees offsets
ahead of the rows they stand for (invariant 5, docs/INVARIANTS.md).
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from streamhps.config import TableSpec
from streamhps.errors import ConfigError, UnknownTableError


@dataclass
class TableRows:
    """Uncompacted rows of one table gathered from a batch of messages, in arrival order."""

    keys: list[np.ndarray] = field(default_factory=list)
    vectors: list[np.ndarray] = field(default_factory=list)
    versions: list[np.ndarray] = field(default_factory=list)

    def add(self, keys: np.ndarray, vectors: np.ndarray, versions: np.ndarray) -> None:
        self.keys.append(keys)
        self.vectors.append(vectors)
        self.versions.append(versions)

    @property
    def row_count(self) -> int:
        return sum(int(k.shape[0]) for k in self.keys)


@dataclass
class WriteBatch:
    """Everything one write transaction applies.

    ``offsets``: ``(topic, partition) -> next offset to consume``; ``applied``:
    ``(table, partition) -> marker version`` (stored as the max of old and new);
    ``messages`` / ``dlq``: per-table message counts, kept in the compaction stats;
    ``topic_ids``: topic -> broker topic id the offsets refer to (a new id = history lost).
    """

    rows: dict[str, TableRows] = field(default_factory=dict)
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    applied: dict[tuple[str, int], int] = field(default_factory=dict)
    messages: dict[str, int] = field(default_factory=dict)
    dlq: dict[str, int] = field(default_factory=dict)
    topic_ids: dict[str, str] = field(default_factory=dict)

    def table_rows(self, table: str) -> TableRows:
        return self.rows.setdefault(table, TableRows())

    def __bool__(self) -> bool:
        return bool(self.rows or self.offsets or self.applied or self.topic_ids)


@dataclass
class TableWriteResult:
    """What compaction did to one table's rows in one batch."""

    rows_in: int = 0
    rows_written: int = 0
    rows_duplicate: int = 0  # superseded by a newer (or equal) version of the key in the same batch
    rows_stale: int = 0  # not newer than the version the store already held


NEW_STORE_ADVICE = "use a new --store directory"
"""What a writer's shape refusal tells the operator."""


def check_store_shape(spec: TableSpec, stored: TableSpec | None, store: str, advice: str) -> None:
    """Refuse a table whose configured dim/dtype/partitions differ from what ``store`` holds
    (rows of another shape cannot be read back); ``advice`` says what to do."""
    if stored is None:
        return
    if (stored.dim, stored.dtype, stored.partitions) != (spec.dim, spec.dtype, spec.partitions):
        raise ConfigError(
            f"table {spec.name!r}: the config says dim={spec.dim} dtype={spec.dtype} "
            f"partitions={spec.partitions} but store {store} holds dim={stored.dim} "
            f"dtype={stored.dtype} partitions={stored.partitions}; {advice}"
        )


def absent_rows(spec: TableSpec, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The answer of :meth:`StoreReader.get` for ``n`` keys none of which is held: zero rows,
    version 0, not found (filled in where rows are found)."""
    return (
        np.zeros((n, spec.dim), dtype=spec.np_dtype),
        np.zeros(n, dtype=np.int64),
        np.zeros(n, dtype=bool),
    )


class StoreReader(abc.ABC):
    """Read access; safe to hold in many processes while the writer commits."""

    @abc.abstractmethod
    def tables(self) -> dict[str, TableSpec]:
        """Table name -> spec (dim, dtype, partitions) as stored."""

    @abc.abstractmethod
    def held_partitions(self, table: str) -> list[int]:
        """Partitions of ``table`` this store holds (its processor shard's)."""

    @abc.abstractmethod
    def get(self, table: str, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(values [n, dim], versions int64 [n], found bool [n])``; zeros and version 0 where not found."""

    def get_many(
        self, keys: Mapping[str, np.ndarray]
    ) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """:meth:`get` of several tables (one read transaction where the store allows): table ->
        ``(values, versions, found)``; tables the store does not hold are left out."""
        out = {}
        for table, k in keys.items():
            try:
                out[table] = self.get(table, k)
            except UnknownTableError:
                continue
        return out

    @abc.abstractmethod
    def applied_version(self, table: str) -> int | None:
        """Highest version whose marker every held partition applied; None before any."""

    @abc.abstractmethod
    def partition_applied_versions(self, table: str) -> dict[int, int]:
        """Partition -> applied version, for partitions that applied a marker."""

    @abc.abstractmethod
    def offsets(self) -> dict[tuple[str, int], int]:
        """``(topic, partition) -> next offset to consume``, as of the latest commit."""

    def topic_ids(self) -> dict[str, str]:
        """Topic -> the broker's topic id the stored offsets refer to (none recorded: empty)."""
        return {}

    @abc.abstractmethod
    def iter_rows(
        self, table: str, batch_rows: int = 65536
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Yield ``(keys int64, values [n, dim], versions int64)`` in key order, from one snapshot."""

    @abc.abstractmethod
    def stats(self) -> dict[str, Any]:
        """Row counts, size on disk, compaction counters, applied versions, offsets."""

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> StoreReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class StoreWriter(StoreReader):
    """The single writer of a store (one processor per store)."""

    @abc.abstractmethod
    def ensure_tables(
        self, specs: Mapping[str, TableSpec], held: Mapping[str, list[int]] | None = None
    ) -> None:
        """Record the tables (and the partitions this store holds); refuse a changed dim/dtype/partitions."""

    @abc.abstractmethod
    def write_batch(self, batch: WriteBatch) -> dict[str, TableWriteResult]:
        """Compact and apply ``batch`` in one transaction; return per-table compaction results."""
