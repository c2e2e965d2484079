"""How far behind the stream head a worker is, per table and partition (invariant 4, docs/INVARIANTS.md).

The three freshness figures (publish -> visible, seconds behind the head, versions behind) and
how commit cadence enters them are defined in ``schemas/README.md`` ("Freshness").

The worker learns the head from watermark probes: every ``probe_interval`` a monitor thread
asks the broker for each partition's high watermark, noting the time it *sent* the request.
A probe ``(hw, t)`` says "at time ``t`` the partition held fewer than ``hw`` messages". Once the
worker's position (next offset to consume) reaches ``hw``, it held everything published before
``t``: the partition is *caught up as of* ``t``.

``seconds = now - caught_up_as_of``. While the worker keeps up and the broker answers, that is
one probe interval at most. While it lags, the oldest unapplied message was published after the
last time it was caught up, so this is an upper bound on the age of the oldest unapplied
message (exact to one probe interval). While the broker cannot be reached no probe succeeds, so
it is the time since the broker was last reached. Over-estimating is the safe side: a bounded
read never gets served past the bound.

Versions behind: ``head - applied`` where ``applied`` is the partition's last commit marker the
worker applied and ``head`` the newest version the worker knows was committed (the highest
marker it applied on any partition of the table, or the store's applied versions; a commit
writes its marker to every partition, so a marker seen anywhere is committed everywhere).
It is counted in version units (equal to the number of commits when versions are consecutive)
and does not see commits none of the worker's partitions has delivered yet.

The high watermark of a probe is the larger of the broker's ListOffsets answer and the
consumer's cached watermark from its last fetch (the embedded Tansu broker answers ListOffsets
with the base offset of the last record batch + 1, which is low when a batch holds several
messages; the fetch response's watermark is right). The ingest thread, which owns the consumer,
reads the cached watermarks (:meth:`LagTracker.fetched`); the probe thread never calls the
consumer: a ``get_watermark_offsets`` from another thread waited 15-30 s behind the ingest
thread's ``consume`` (lock starvation inside the client), and staleness grew all that time.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

_MAX_PENDING = 256


def max_seconds_of(caught_up_at: np.ndarray, now: float | None = None) -> tuple[float, int]:
    """(seconds, partition): the worst staleness of a table from its partitions' caught-up
    times. Safe without the tracker's lock: the times only grow, and a read that races a write
    sees the older, more stale, one."""
    now = time.monotonic() if now is None else now
    cu = caught_up_at.copy()
    p = int(np.argmin(cu))
    return float(now - cu[p]), p


class _TableLag:
    def __init__(
        self,
        partitions: int,
        owned: Sequence[int] | None = None,
        caught_up_at: np.ndarray | None = None,
    ) -> None:
        self.position = np.zeros(partitions, dtype=np.int64)  # next offset to consume
        self.high_watermark = np.full(partitions, -1, dtype=np.int64)
        self.fetched_hw = np.full(partitions, -1, dtype=np.int64)  # the consumer's, last fetch
        # monotonic seconds (CLOCK_MONOTONIC: one clock for every process of the machine)
        self.caught_up_at = np.empty(partitions) if caught_up_at is None else caught_up_at
        self.caught_up_at[:] = -math.inf
        # Partitions another shard serves: never the worst, never reported.
        self.owned = np.ones(partitions, dtype=bool)
        if owned is not None:
            self.owned[:] = False
            self.owned[list(owned)] = True
            self.caught_up_at[~self.owned] = math.inf
        self.applied = np.full(partitions, -1, dtype=np.int64)  # last marker applied, -1 none
        self.pending: list[list[tuple[int, float]]] = [[] for _ in range(partitions)]
        self.store_head = -1


class LagTracker:
    """Per-partition position, head probes, caught-up time and applied version. Thread-safe."""

    def __init__(
        self,
        partitions: dict[str, int],
        owned: Mapping[str, Sequence[int]] | None = None,
        caught_up_at: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        """``partitions``: table -> partition count; ``owned``: table -> the partitions this
        worker serves (a sharded worker), default all; ``caught_up_at``: table -> a float64
        array of its partition count to keep the caught-up times in (memory a serving process
        reads them from: :func:`max_seconds_of`)."""
        self._lock = threading.Lock()
        self._t = {
            name: _TableLag(
                n,
                None if owned is None else owned.get(name, ()),
                None if caught_up_at is None else caught_up_at[name],
            )
            for name, n in partitions.items()
        }
        self.last_contact: float | None = None  # monotonic time of the last answered probe
        self.history_lost: list[tuple[str, int, int, int]] = []

    def start_at(self, table: str, partition: int, offset: int, applied: int | None) -> None:
        with self._lock:
            t = self._t[table]
            t.position[partition] = offset
            if applied is not None:
                t.applied[partition] = applied

    def consumed(self, table: str, partition: int, next_offset: int) -> None:
        """The worker applied everything of ``partition`` before ``next_offset``."""
        with self._lock:
            t = self._t[table]
            t.position[partition] = next_offset
            pend = t.pending[partition]
            while pend and pend[0][0] <= next_offset:
                t.caught_up_at[partition] = max(t.caught_up_at[partition], pend.pop(0)[1])

    def owned_partitions(self, table: str) -> list[int]:
        return [int(p) for p in np.flatnonzero(self._t[table].owned)]

    def fetched(self, table: str, partition: int, high_watermark: int) -> None:
        """The consumer's cached high watermark from its last fetch (read on the ingest thread).
        Taken as it is, not as a maximum: after the broker lost the partition's history it drops
        below the position, which is how the probe notices."""
        with self._lock:
            self._t[table].fetched_hw[partition] = high_watermark

    def fetched_high_watermarks(self, table: str) -> np.ndarray:
        with self._lock:
            return self._t[table].fetched_hw.copy()

    def marker(self, table: str, partition: int, version: int) -> None:
        with self._lock:
            t = self._t[table]
            t.applied[partition] = max(int(t.applied[partition]), version)

    def store_applied(self, table: str, versions: dict[int, int]) -> None:
        if versions:
            with self._lock:
                self._t[table].store_head = max(versions.values())

    def probed(self, table: str, partition: int, high_watermark: int, sent_at: float) -> None:
        """A probe sent at ``sent_at`` (monotonic) found ``high_watermark``."""
        with self._lock:
            self.last_contact = max(self.last_contact or sent_at, sent_at)
            t = self._t[table]
            t.high_watermark[partition] = max(int(t.high_watermark[partition]), high_watermark)
            if t.position[partition] >= high_watermark:
                t.caught_up_at[partition] = max(t.caught_up_at[partition], sent_at)
                t.pending[partition].clear()
                return
            pend = t.pending[partition]
            if pend and pend[-1][0] >= high_watermark:
                return  # an earlier probe already asks for at least this much
            pend.append((high_watermark, sent_at))
            if len(pend) > _MAX_PENDING:  # thin out: later catch-up only gets reported later
                del pend[1::2]

    def note_history_lost(
        self, table: str, partition: int, position: int, high_watermark: int
    ) -> None:
        with self._lock:
            self.history_lost.append((table, partition, position, high_watermark))

    # ---------------------------------------------------------------- readers

    def max_seconds(self, table: str, now: float | None = None) -> tuple[float, int]:
        """Worst staleness of ``table`` in seconds and the partition that has it."""
        with self._lock:
            return max_seconds_of(self._t[table].caught_up_at, now)

    def position(self, table: str) -> np.ndarray:
        with self._lock:
            return self._t[table].position.copy()

    def report(self, now: float | None = None) -> dict[str, dict[int, dict[str, Any]]]:
        now = time.monotonic() if now is None else now
        out: dict[str, dict[int, dict[str, Any]]] = {}
        with self._lock:
            for name, t in self._t.items():
                head = max(int(t.applied.max(initial=-1)), t.store_head)
                rows: dict[int, dict[str, Any]] = {}
                for p in np.flatnonzero(t.owned).tolist():
                    applied = int(t.applied[p])
                    hw = int(t.high_watermark[p])
                    rows[p] = {
                        "seconds": float(now - t.caught_up_at[p]),
                        "versions_behind": max(0, head - max(applied, 0)) if head > 0 else 0,
                        "applied_version": applied if applied >= 0 else None,
                        "offset": int(t.position[p]),
                        "high_watermark": hw if hw >= 0 else None,
                        "lag_messages": max(0, hw - int(t.position[p])) if hw >= 0 else None,
                    }
                out[name] = rows
        return out
