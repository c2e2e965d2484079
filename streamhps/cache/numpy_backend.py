"""The ``numpy`` cache backend: the set-associative table of ``base`` in host memory.

Every operation is a handful of whole-array numpy steps (a [n, 32] key compare per probe, one
lexsort per upsert for the duplicate rule, one per-bucket lexsort for eviction choices); no
Python loop touches rows. Thread safety: the base class's lock around every operation.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from streamhps.cache.base import SLOTS_PER_BUCKET, EmbeddingCache, hash_keys
from streamhps.errors import CacheError

_EMPTY = np.iinfo(np.int64).min  # key stored in empty slots; real keys equal to it use _occ
_LOW32 = np.uint64(0xFFFFFFFF)
_B = SLOTS_PER_BUCKET


class NumpyCache(EmbeddingCache):
    backend = "numpy"

    def __init__(self, capacity: int, dim: int, dtype: Any = "float32", policy: str = "lru"):
        super().__init__(capacity, dim, dtype, policy)
        nb, slots = self.n_buckets, self.capacity
        self._ktab = np.full((nb, _B), _EMPTY, dtype=np.int64)
        self._occ = np.zeros((nb, _B), dtype=bool)
        self._ver = np.zeros(slots, dtype=np.int64)
        self._score = np.zeros(slots, dtype=np.uint64)
        self._stamp = np.zeros(slots, dtype=np.uint32)
        self._vals = np.zeros((slots, self.dim), dtype=self.dtype)
        # Touch every page now: the first write into a fresh page faults (~1 us per 4 KiB), which
        # would otherwise land on the stream's first inserts, on the ingest thread.
        for a in (self._ktab, self._occ, self._ver, self._score, self._stamp, self._vals):
            a.reshape(-1)[:: max(1, 4096 // a.itemsize)] = a.reshape(-1)[0]
        self._hits = 0

    # ------------------------------------------------------------------ helpers
    def _as_array(self, a: Any) -> np.ndarray:
        if hasattr(a, "__cuda_array_interface__"):
            raise CacheError("the numpy cache takes host arrays; got a GPU array (use .get())")
        return np.asarray(a)

    def _contiguous(self, a: Any) -> np.ndarray:
        return np.ascontiguousarray(a)

    def _find(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(slot, hit) per key; slot is -1 on a miss."""
        n = keys.shape[0]
        b, _ = hash_keys(keys, self.n_buckets)
        m = self._ktab[b] == keys[:, None]
        sentinel = keys == _EMPTY
        if sentinel.any():
            m[sentinel] &= self._occ[b[sentinel]]
        idx = m.argmax(axis=1)
        hit = m[np.arange(n), idx]
        slot = np.where(hit, b * _B + idx, -1)
        return slot, hit

    def _stamp_of(self, clock: int) -> np.uint32:
        return np.uint32(clock & 0xFFFFFFFF)

    # ------------------------------------------------------------------ operations
    def _lookup(self, keys: np.ndarray, clock: int) -> tuple[np.ndarray, np.ndarray]:
        slot, hit = self._find(keys)
        out = np.take(self._vals, np.where(hit, slot, 0), axis=0)
        if not hit.all():
            out[~hit] = 0
        hs = slot[hit]
        self._hits += int(hs.shape[0])
        if hs.shape[0]:
            if self.policy == "lru":
                self._score[hs] = np.uint64(clock)
            else:
                s = self._score[hs]
                c32 = np.uint64(clock & 0xFFFFFFFF)
                fresh = (s & _LOW32) != c32  # once per lookup call, however often the key repeats
                count = np.minimum((s >> np.uint64(32)) + np.uint64(1), _LOW32)
                self._score[hs] = np.where(fresh, (count << np.uint64(32)) | c32, s)
        return out, hit

    def _lookup_pooled(
        self, keys: np.ndarray, offsets: np.ndarray, mode: str, clock: int
    ) -> tuple[np.ndarray, np.ndarray]:
        rows, hit = self._lookup(keys, clock)
        return pool_rows(rows, offsets, mode, self.dtype), hit

    def _get_versions(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        slot, hit = self._find(keys)
        return np.where(hit, self._ver[slot], 0), hit

    def _upsert(
        self, keys: np.ndarray, values: np.ndarray, versions: np.ndarray, clock: int, insert: bool
    ) -> dict[str, int]:
        c = {"inserted_empty": 0, "evictions": 0, "updates": 0, "dropped": 0, "absent": 0}
        n = keys.shape[0]
        if n == 0:
            return c
        stamp = self._stamp_of(clock)
        if n < 2 or bool((keys[1:] > keys[:-1]).all()):
            # already one row per key (the worker's stream applies arrive sorted and unique)
            sel = np.arange(n)
            group_size = np.ones(n, dtype=np.int64)
        else:
            # one row per distinct key: the highest version (ties: the later row)
            order = np.lexsort((versions, keys))
            ks = keys[order]
            last = np.ones(n, dtype=bool)
            last[:-1] = ks[:-1] != ks[1:]
            sel = order[last]
            group_size = np.diff(np.concatenate(([-1], np.flatnonzero(last))))
        uk, uv = keys[sel], versions[sel]
        slot, hit = self._find(uk)

        # resident keys: newer versions only
        ps = slot[hit]
        newer = uv[hit] > self._ver[ps]
        ws = ps[newer]
        self._vals[ws] = values[sel[hit][newer]]
        self._ver[ws] = uv[hit][newer]
        self._stamp[ws] = stamp
        c["updates"] = int(ws.shape[0])
        miss = ~hit
        if not insert:
            c["absent"] = int(group_size[miss].sum())
            return c
        if not miss.any():
            return c

        # absent keys: empty slots first, then the lowest (score, key) not written by this call
        mk, mrows, mv = uk[miss], sel[miss], uv[miss]
        b, _ = hash_keys(mk, self.n_buckets)
        o = np.argsort(b, kind="stable")
        b, mk, mrows, mv = b[o], mk[o], mrows[o], mv[o]
        ub, start, cnt = np.unique(b, return_index=True, return_counts=True)
        g = np.repeat(np.arange(ub.shape[0]), cnt)
        rank = np.arange(b.shape[0]) - start[g]
        occ = self._occ[ub]
        free = ~occ
        n_free = free.sum(axis=1)
        st = self._stamp.reshape(-1, _B)[ub]
        avail = n_free + (occ & (st != stamp)).sum(axis=1)
        ok = rank < avail[g]
        local = np.zeros(b.shape[0], dtype=np.int64)
        # Empty slots first, in slot order (what the (class, score, key) order gives them, all
        # empties being equal): the r-th insert of a bucket takes its r-th empty slot, no sort.
        in_empty = rank < n_free[g]
        first = in_empty & (rank == 0)  # the usual case: one insert into a bucket
        local[first] = free.argmax(axis=1)[g[first]]
        later = in_empty & (rank > 0)
        if later.any():
            nth = np.cumsum(free[g[later]], axis=1)  # empties up to and including each slot
            local[later] = (nth <= rank[later, None]).sum(axis=1)
        evicting = ok & ~in_empty
        if evicting.any():
            # Full buckets only: eligible slots (not written by this call) by (score, key).
            rows = np.unique(g[evicting])
            o, s_, k_ = occ[rows], st[rows], self._ktab[ub[rows]]
            sc = self._score.reshape(-1, _B)[ub[rows]]
            cls = np.where(~o, 0, np.where(s_ == stamp, 2, 1))
            order_in_bucket = np.lexsort((k_, sc, cls), axis=-1)
            local[evicting] = order_in_bucket[np.searchsorted(rows, g[evicting]), rank[evicting]]
        gi = g[ok]
        local = local[ok]
        was_occ = occ[gi, local]
        s = ub[gi] * _B + local
        self._ktab.reshape(-1)[s] = mk[ok]
        self._occ.reshape(-1)[s] = True
        self._vals[s] = values[mrows[ok]]
        self._ver[s] = mv[ok]
        if self.policy == "lru":
            self._score[s] = np.uint64(clock)
        else:
            self._score[s] = np.uint64((1 << 32) | (clock & 0xFFFFFFFF))
        self._stamp[s] = stamp
        c["evictions"] = int(was_occ.sum())
        c["inserted_empty"] = int(s.shape[0]) - c["evictions"]
        c["dropped"] = int((~ok).sum())
        return c

    def _evict(self, keys: np.ndarray) -> int:
        slot, hit = self._find(np.unique(keys))
        s = slot[hit]
        self._ktab.reshape(-1)[s] = _EMPTY
        self._occ.reshape(-1)[s] = False
        self._ver[s] = 0
        self._score[s] = 0
        self._stamp[s] = 0
        return int(s.shape[0])

    def _clear(self) -> None:
        self._ktab.fill(_EMPTY)
        self._occ.fill(False)
        self._ver.fill(0)
        self._score.fill(0)
        self._stamp.fill(0)
        self._vals.fill(0)

    def _hits_total(self) -> int:
        return self._hits


def pool_rows(rows: np.ndarray, offsets: np.ndarray, mode: str, dtype: np.dtype) -> np.ndarray:
    """Sum (or mean) of ``rows[offsets[b]:offsets[b + 1]]`` per bag, accumulated in float32;
    empty bags are zeros (as ``embedding_bag``)."""
    n_bags = offsets.shape[0] - 1
    out = np.zeros((n_bags, rows.shape[1]), dtype=np.float32)
    lens = np.diff(offsets)
    full = lens > 0
    if full.any():
        # reduceat over the starts of non-empty bags: each sums up to the next start (empty bags
        # between two starts share it), the last one to the end
        out[full] = np.add.reduceat(rows.astype(np.float32, copy=False), offsets[:-1][full], axis=0)
        if mode == "mean":
            out[full] /= lens[full, None].astype(np.float32)
    return out.astype(dtype, copy=False)
