"""The worker's window of recent rows: what it consumed that the LMDB tier may not hold yet.

Invariant 3 (no stale resurrection, docs/INVARIANTS.md): a worker that consumed version 2 of
a key it did not cache, and later misses that key while the processor is still writing
version 1 to LMDB, must serve version 2. So the worker keeps every row it consumed until the store's
offsets show that the processor has written it, and a miss consults this window before LMDB
(the higher version wins).

Layout: one :class:`RecentRows` per table, a short tuple of immutable chunks in arrival order.
Each chunk is sorted by key with one row per key (its highest version), plus each row's Kafka
partition and offset. A chunk does not copy its rows' vectors: it keeps the arrays they arrived
in (``sources``: the decoded messages' vectors, read-only views of the Kafka bytes) and per key
the source and the row in it, so a batch reaches the window without a copy of its vectors.
New chunks merge with their neighbour while it is at most twice their size (a log-structured
merge: O(log n) chunks), dropping rows the store already holds; a merge moves 36 bytes of index
per row, never the row, and lets go of arrays no live row points into any more; a chunk whose
arrays hold more than ``MAX_HELD_PER_LIVE_ROW`` rows per live row (a hot key set rewritten
message after message keeps one live row in each) gathers its live rows into one array. No merge makes a chunk of more than ``merge_cap`` rows:
the merge runs on the ingest thread, and a merge whose cost grew with the whole window (a
lagging processor leaves every row in it) would hold back every update behind it. Past the cap
the window is a list of full chunks (lookups search each; their count is window rows / cap)
that prune drops whole once the store holds their rows. Merging two sorted chunks is linear (a
stable sort of two sorted runs is a merge). A chunk whose rows are all below the store's
offsets is dropped whole. The ingest thread is the only writer; readers take the tuple as a
snapshot without a lock (copy-on-write). The worker's ingest thread adds a batch's chunk
unmerged (``add(..., compact=False)``) and does its merges (:meth:`RecentRows.compact`) after
the batch's rows are visible, one merge at a time while no batch waits: the merge cascades of
small batches were the window's share of consumed -> visible (on the H200 at 200-500 k rows/s,
250-750 us per 1 000 rows on the apply thread, passes of up to 15 ms).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np


class Chunk(NamedTuple):
    """Rows sorted by key, unique keys, each with the offset of the message it came from; a
    key's vector is ``sources[src[i]][row[i]]``."""

    keys: np.ndarray  # int64 [n], sorted, unique
    versions: np.ndarray  # int64 [n]
    partitions: np.ndarray  # int32 [n]
    offsets: np.ndarray  # int64 [n]
    src: np.ndarray  # int32 [n]: index into sources
    row: np.ndarray  # int64 [n]: row in that source
    sources: tuple[np.ndarray, ...]  # [rows, dim] arrays
    max_offset: np.ndarray  # int64 [table partitions]: newest offset per partition, -1 if none

    @property
    def rows(self) -> int:
        return int(self.keys.shape[0])

    def vectors(self, idx: np.ndarray, out: np.ndarray) -> None:
        """``out[j] = vector of row idx[j]`` of this chunk."""
        gather(self.sources, self.src[idx], self.row[idx], out)


def gather(
    sources: Sequence[np.ndarray], src: np.ndarray, row: np.ndarray, out: np.ndarray
) -> None:
    """``out[j] = sources[src[j]][row[j]]``: one fancy gather per source used."""
    if len(sources) == 1:
        if sources[0].dtype == out.dtype:
            np.take(sources[0], row, axis=0, out=out)
        else:
            out[:] = sources[0][row]
        return
    order = np.argsort(src, kind="stable")
    ss = src[order]
    starts = np.flatnonzero(np.concatenate(([True], ss[1:] != ss[:-1])))
    ends = np.append(starts[1:], ss.shape[0])
    for lo, hi in zip(starts.tolist(), ends.tolist(), strict=True):
        j = order[lo:hi]
        out[j] = sources[int(ss[lo])][row[j]]


def latest_rows(keys: np.ndarray, versions: np.ndarray) -> np.ndarray:
    """One row per key, the highest version (the later one on ties), as indices into ``keys``
    in key order."""
    n = keys.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    # An unstable sort by key alone (several times faster than a two-key lexsort); rows of a
    # key that occurs more than once are then ordered by (key, version, arrival) among
    # themselves, usually few.
    order = np.argsort(keys)
    ks = keys[order]
    same = ks[1:] == ks[:-1]
    if same.any():
        in_dup = np.zeros(n, dtype=bool)
        in_dup[:-1] |= same
        in_dup[1:] |= same
        pos = np.flatnonzero(in_dup)  # sorted positions of rows whose key repeats
        rows = order[pos]
        o2 = np.lexsort((rows, versions[rows], ks[pos]))  # highest version, then latest, last
        gk = ks[pos][o2]  # group keys, each group ending in its winner
        last = np.empty(gk.shape[0], dtype=bool)
        last[-1] = True
        np.not_equal(gk[1:], gk[:-1], out=last[:-1])
        # A group's sorted positions are interchangeable: its winner takes the first one.
        kp = ks[pos]
        first = np.empty(kp.shape[0], dtype=bool)
        first[0] = True
        np.not_equal(kp[1:], kp[:-1], out=first[1:])
        order = order.copy()
        order[pos[first]] = rows[o2[last]]  # groups in key order on both sides
        keep = ~in_dup
        keep[pos[first]] = True
        return order[keep]
    return order


MERGE_CAP = 1 << 16  # rows; a merge moves at most this many rows' index entries
#: a chunk whose arrays hold more than this many rows per live row (and more than
#: MIN_GATHER_ROWS rows) gathers its live rows into one array: bounds the memory superseded
#: rows keep alive to 4x what the live rows need
MAX_HELD_PER_LIVE_ROW = 4
MIN_GATHER_ROWS = 4096


class RecentRows:
    """Rows of one table consumed by this worker and possibly not yet in LMDB."""

    def __init__(
        self, dim: int, dtype: np.dtype, partitions: int, merge_cap: int = MERGE_CAP
    ) -> None:
        self.merge_cap = merge_cap
        self.dim = dim
        self.dtype = np.dtype(dtype)
        self.partitions = partitions
        self._chunks: tuple[Chunk, ...] = ()
        # Next offset the store holds per partition; 0 = none, so nothing is pruned.
        self._store_next = np.zeros(partitions, dtype=np.int64)
        self.epoch = 0  # grows whenever rows leave the window (readers use it to detect races)
        self._settled = 0  # leading chunks merged as on add; the rest await compact()

    # ---------------------------------------------------------------- writer (ingest thread)

    def add(
        self,
        keys: np.ndarray,
        versions: np.ndarray,
        vectors: np.ndarray | Sequence[np.ndarray],
        partitions: np.ndarray,
        offsets: np.ndarray,
        *,
        src: np.ndarray | None = None,
        row: np.ndarray | None = None,
        compact: bool = True,
    ) -> None:
        """Add rows already reduced by :func:`latest_rows` (sorted, one row per key).

        ``vectors``: the rows' vectors aligned with ``keys``; or the arrays they are in, with
        ``src``/``row`` giving each key's array and row (no copy: the window keeps the arrays,
        which must not change afterwards). ``compact=False`` leaves the merges of the new
        chunk into the older ones to a later :meth:`compact` (the worker's ingest thread does
        them after the rows became visible, when no batch waits: the merges of small batches
        were most of the window's time on the way from consumed to visible)."""
        n = keys.shape[0]
        if n == 0:
            return
        if src is None or row is None:
            sources: tuple[np.ndarray, ...] = (np.asarray(vectors),)
            src, row = np.zeros(n, dtype=np.int32), np.arange(n, dtype=np.int64)
        else:
            sources = tuple(vectors)
        max_off = np.full(self.partitions, -1, dtype=np.int64)
        np.maximum.at(max_off, partitions, offsets)
        chunks = [
            *self._chunks,
            Chunk(keys, versions, partitions.astype(np.int32, copy=False), offsets,
                  src.astype(np.int32, copy=False), row, sources, max_off),
        ]  # fmt: skip
        self._chunks = tuple(chunks)
        if compact:
            self.compact()

    def compact(self, merges: int | None = None) -> bool:
        """Do the merges :meth:`add` left (``compact=False``), in the order merges on add do
        them: the chunks end as if each had been merged when it was added. At most ``merges``
        merges (``None``: all), so that a caller can stop between two; returns True when none
        is left."""
        chunks = list(self._chunks)
        settled, done = self._settled, 0
        while True:
            if settled >= 2 and self._mergeable(chunks[settled - 2], chunks[settled - 1]):
                if merges is not None and done >= merges:
                    break
                merged = self._merge(chunks[settled - 2], chunks[settled - 1])
                chunks[settled - 2 : settled] = [merged] if merged is not None else []
                settled -= 1 if merged is not None else 2
                done += 1
            elif settled < len(chunks):
                settled += 1  # the next chunk added unmerged: merged into the ones before
            else:
                break
        self._chunks, self._settled = tuple(chunks), settled
        return self.merged

    @property
    def pending(self) -> int:
        """Chunks added unmerged that :meth:`compact` has not reached yet."""
        return len(self._chunks) - self._settled

    @property
    def merged(self) -> bool:
        """No merge left to do (:meth:`compact`)."""
        c, s = self._chunks, self._settled
        return s == len(c) and not (s >= 2 and self._mergeable(c[s - 2], c[s - 1]))

    def _mergeable(self, older: Chunk, newer: Chunk) -> bool:
        """A binary counter: the last two chunks merge while the younger holds at least half
        the older's rows (each row is merged about log2(merge_cap / batch rows) times, and the
        window holds few chunks), up to ``merge_cap`` rows."""
        return older.rows <= 2 * newer.rows and older.rows + newer.rows <= self.merge_cap

    def prune(self, store_next: np.ndarray) -> int:
        """Forget rows the store holds (``offset < store_next[partition]``); returns chunks dropped."""
        self._store_next = np.asarray(store_next, dtype=np.int64)
        gone = [bool(np.all(c.max_offset < self._store_next)) for c in self._chunks]
        dropped = sum(gone)
        if dropped:
            self._settled -= sum(gone[: self._settled])
            self._chunks = tuple(c for c, g in zip(self._chunks, gone, strict=True) if not g)
            self.epoch += 1
        return dropped

    def clear(self) -> None:
        self._chunks = ()
        self._settled = 0
        self.epoch += 1

    def _merge(self, older: Chunk, newer: Chunk) -> Chunk | None:
        """Two key-sorted unique chunks -> one; a key in both keeps the higher version (the
        newer chunk's on ties). Linear: a stable sort of two sorted runs is one merge pass."""
        keys = np.concatenate([older.keys, newer.keys])
        order = np.argsort(keys, kind="stable")  # equal keys: the older chunk's row first
        keys = keys[order]
        versions = np.concatenate([older.versions, newer.versions])[order]
        parts = np.concatenate([older.partitions, newer.partitions])[order]
        offs = np.concatenate([older.offsets, newer.offsets])[order]
        keep = offs >= self._store_next[parts]
        if not keep.all():
            self.epoch += 1
        # Each key occurs at most twice (once per chunk), adjacent: of two live rows drop the
        # older unless its version is higher, in which case drop the newer one.
        dup = np.flatnonzero((keys[1:] == keys[:-1]) & keep[1:] & keep[:-1])
        if dup.size:
            older_wins = versions[dup] > versions[dup + 1]
            keep[dup[~older_wins]] = False
            keep[dup[older_wins] + 1] = False
        if not keep.any():
            return None
        sel = order if keep.all() else order[keep]
        if not keep.all():
            keys, versions, parts, offs = keys[keep], versions[keep], parts[keep], offs[keep]
        shift = np.int32(len(older.sources))
        src = np.concatenate([older.src, newer.src + shift])[sel]
        row = np.concatenate([older.row, newer.row])[sel]
        sources = older.sources + newer.sources
        used = np.zeros(len(sources), dtype=bool)
        used[src] = True
        if not used.all():
            # drop arrays no live row points into (superseded or stored rows): frees their bytes
            remap = np.cumsum(used, dtype=np.int32) - 1
            src = remap[src]
            sources = tuple(a for a, u in zip(sources, used, strict=True) if u)
        held = sum(a.shape[0] for a in sources)
        if held > MIN_GATHER_ROWS and keys.shape[0] * MAX_HELD_PER_LIVE_ROW < held:
            # Most rows of the arrays it keeps alive are superseded (a hot key set rewritten
            # message after message): gather the live ones, let the messages go.
            vectors = np.empty((keys.shape[0], self.dim), dtype=self.dtype)
            gather(sources, src, row, vectors)
            sources = (vectors,)
            src = np.zeros(keys.shape[0], dtype=np.int32)
            row = np.arange(keys.shape[0], dtype=np.int64)
        max_off = np.full(self.partitions, -1, dtype=np.int64)
        np.maximum.at(max_off, parts, offs)
        return Chunk(keys, versions, parts, offs, src, row, sources, max_off)

    # ---------------------------------------------------------------- readers (any thread)

    def get(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Newest row per key in the window: ``(vectors [n, dim], versions [n], found [n])``.

        Versions are 0 and vectors zero where not found.
        """
        chunks = self._chunks  # snapshot
        n = keys.shape[0]
        best_v = np.zeros(n, dtype=np.int64)
        best_c = np.full(n, -1, dtype=np.int64)
        best_r = np.zeros(n, dtype=np.int64)
        for ci, c in enumerate(chunks):
            if c.rows == 0:
                continue
            idx = np.searchsorted(c.keys, keys)
            np.minimum(idx, c.rows - 1, out=idx)
            better = (c.keys[idx] == keys) & (c.versions[idx] > best_v)
            if better.any():
                best_v[better] = c.versions[idx[better]]
                best_c[better] = ci
                best_r[better] = idx[better]
        vectors = np.zeros((n, self.dim), dtype=self.dtype)
        for ci, c in enumerate(chunks):
            sel = np.flatnonzero(best_c == ci)
            if sel.size:
                part = np.empty((sel.size, self.dim), dtype=self.dtype)
                c.vectors(best_r[sel], part)
                vectors[sel] = part
        return vectors, best_v, best_c >= 0

    @property
    def rows(self) -> int:
        return sum(c.rows for c in self._chunks)

    @property
    def chunks(self) -> int:
        return len(self._chunks)

    @property
    def nbytes(self) -> int:
        """Bytes the window holds alive: its index entries and every array its rows are in."""
        chunks = self._chunks
        arrays = {id(a): a.nbytes for c in chunks for a in c.sources}
        return sum(arrays.values()) + sum(c.rows * 36 for c in chunks)
