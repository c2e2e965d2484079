"""The ``numpy`` cache backend: the set-associative table of ``base`` in host memory.

Every operation is a handful of whole-array numpy steps; no Python loop touches rows. A probe
compares the key's one-byte digest against its bucket's 32 digests (one 32-byte row, the
``cuda`` backend's layout; 0 marks an empty slot) and checks the key only in the first
matching slot, falling back to the bucket's 32 keys for the few keys whose first match was
another key's digest. Gathers of whole bucket rows use ``np.take`` (several times faster than
fancy indexing of a 2-D array). Upsert groups absent keys by bucket with one sort of packed
``(bucket, key rank)`` integers and reads stamps, scores and keys of a bucket only where its
inserts do not fit into its empty slots; rows are scattered into the value table straight from
the caller's array when every row is written. Thread safety: the base class's lock around
every operation.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from streamhps.cache.base import SLOTS_PER_BUCKET, EmbeddingCache, hash_keys
from streamhps.errors import CacheError

_EMPTY = np.iinfo(np.int64).min  # key stored in empty slots (occupancy is the digest's)
_LOW32 = np.uint64(0xFFFFFFFF)
_B = SLOTS_PER_BUCKET


class NumpyCache(EmbeddingCache):
    backend = "numpy"

    def __init__(self, capacity: int, dim: int, dtype: Any = "float32", policy: str = "lru"):
        super().__init__(capacity, dim, dtype, policy)
        nb, slots = self.n_buckets, self.capacity
        self._ktab = np.full((nb, _B), _EMPTY, dtype=np.int64)
        self._dig = np.zeros((nb, _B), dtype=np.uint8)  # key digest per slot, 0 = empty
        self._ver = np.zeros(slots, dtype=np.int64)
        self._score = np.zeros(slots, dtype=np.uint64)
        self._stamp = np.zeros(slots, dtype=np.uint32)
        self._vals = np.zeros((slots, self.dim), dtype=self.dtype)
        # Touch every page now: the first write into a fresh page faults (~1 us per 4 KiB), which
        # would otherwise land on the stream's first inserts, on the ingest thread.
        for a in (self._ktab, self._dig, self._ver, self._score, self._stamp, self._vals):
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
        slot, hit, _, _ = self._probe(keys)
        return slot, hit

    def _probe(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(slot (-1 on a miss), hit, bucket, digest) per key."""
        n = keys.shape[0]
        b, d = hash_keys(keys, self.n_buckets)
        m = np.take(self._dig, b, axis=0) == d[:, None]  # [n, 32]: digest matches
        idx = m.argmax(axis=1)
        cell = np.arange(n) * _B + idx
        slot = b * _B + idx
        matched = np.take(m.reshape(-1), cell)  # a first match exists ...
        hit = matched & (np.take(self._ktab.reshape(-1), slot) == keys)  # ... holding this key
        # A first match that holds another key (1 - (254/255)^32 = 12 % of absent keys in a
        # full bucket): compare the bucket's keys where the digest matches.
        again = np.flatnonzero(matched & ~hit)
        if again.shape[0]:
            ba, ka = b[again], keys[again]
            ma = (np.take(self._ktab, ba, axis=0) == ka[:, None]) & m[again]
            ia = ma.argmax(axis=1)
            hit[again] = ma[np.arange(again.shape[0]), ia]
            slot[again] = ba * _B + ia
        slot[~hit] = -1
        return slot, hit, b, d

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
        sorted_unique = n < 2 or bool((keys[1:] > keys[:-1]).all())
        by_key = None  # the rows in key order, where unique but not sorted
        if not sorted_unique:
            by_key = np.argsort(keys)  # fast (SIMD); the lexsort below only where keys repeat
            ks = keys[by_key]
            if bool((ks[1:] == ks[:-1]).any()):
                by_key = None
        if sorted_unique or by_key is not None:
            # already one row per key (the worker's stream: sorted, or a piece of a batch without
            # repeats in arrival order, whose rows are then written straight from the messages)
            sel = None
            uk, uv = keys, versions
        else:
            # one row per distinct key: the highest version (ties: the later row)
            order = np.lexsort((versions, keys))
            ks = keys[order]
            last = np.ones(n, dtype=bool)
            last[:-1] = ks[:-1] != ks[1:]
            sel = order[last]
            group_size = np.diff(np.concatenate(([-1], np.flatnonzero(last))))
            uk, uv = keys[sel], versions[sel]
        slot, hit, b, d = self._probe(uk)

        # resident keys: newer versions only (stamped now: this call never evicts them)
        hr = np.flatnonzero(hit)
        ps = slot[hr]
        newer = uv[hr] > np.take(self._ver, ps)
        w_rows, w_slots = hr[newer], ps[newer]
        self._stamp[w_slots] = stamp
        c["updates"] = int(w_rows.shape[0])
        mr = np.flatnonzero(~hit)
        if not insert:
            c["absent"] = int(mr.shape[0] if sel is None else group_size[mr].sum())
        elif mr.shape[0]:
            i_rows, i_slots = self._insert_slots(uk, b, d, mr, by_key, stamp, c)
            if self.policy == "lru":
                self._score[i_slots] = np.uint64(clock)
            else:
                self._score[i_slots] = np.uint64((1 << 32) | (clock & 0xFFFFFFFF))
            self._stamp[i_slots] = stamp
            if w_rows.shape[0]:
                w_rows = np.concatenate([w_rows, i_rows])
                w_slots = np.concatenate([w_slots, i_slots])
            else:
                w_rows, w_slots = i_rows, i_slots
        if w_rows.shape[0]:
            self._ver[w_slots] = np.take(uv, w_rows)
            src = w_rows if sel is None else sel[w_rows]
            if src.shape[0] == n:
                # every input row is written: scatter straight from the input, no gathered copy
                dest = np.empty(n, dtype=np.int64)
                dest[src] = w_slots
                self._vals[dest] = values
            else:
                self._vals[w_slots] = np.take(values, src, axis=0)
        return c

    def _insert_slots(
        self,
        uk: np.ndarray,
        b: np.ndarray,
        d: np.ndarray,
        mr: np.ndarray,
        by_key: np.ndarray | None,
        stamp: np.uint32,
        c: dict[str, int],
    ) -> tuple[np.ndarray, np.ndarray]:
        """Place the absent keys ``uk[mr]`` (``uk`` sorted by key, or in the order ``by_key``):
        empty slots of their bucket first, in slot order, then the lowest ``(score, key)`` not
        written by this call; inside a bucket, keys in key order (the last ones are dropped when
        slots run out). Writes their keys and digests, counts into ``c``. Returns (rows of
        ``uk`` placed, their slots)."""
        n_miss, n = mr.shape[0], uk.shape[0]
        if by_key is None:
            kr = mr  # a row's key rank
        else:
            rank_of = np.empty(n, dtype=np.int64)
            rank_of[by_key] = np.arange(n)
            kr = rank_of[mr]
        # Group by bucket, in key order inside a bucket: one sort of bucket << bits | key rank.
        bits = max(1, int(n - 1).bit_length())
        if int(self.n_buckets - 1).bit_length() + bits <= 63:
            packed = (np.take(b, mr) << bits) | kr
            packed.sort()
            low = packed & ((1 << bits) - 1)
            bs = packed >> bits
        else:  # cannot happen below 2^40 buckets x 2^22 rows per call
            o = np.lexsort((kr, np.take(b, mr)))
            low, bs = kr[o], np.take(b, mr)[o]
        rows = low if by_key is None else by_key[low]
        head = np.empty(n_miss, dtype=bool)
        head[0] = True
        np.not_equal(bs[1:], bs[:-1], out=head[1:])
        start = np.flatnonzero(head)
        ub = bs[start]
        g = np.cumsum(head) - 1  # group (bucket) of each insert
        rank = np.arange(n_miss) - start[g]
        cnt = np.diff(np.append(start, n_miss))
        free = np.take(self._dig, ub, axis=0) == 0  # [u, 32]
        first_free = free.argmax(axis=1)
        simple = (cnt == 1) & np.take(free.reshape(-1), np.arange(ub.shape[0]) * _B + first_free)
        local = first_free[g]  # the usual case: one insert into a bucket with an empty slot
        ok = np.ones(n_miss, dtype=bool)
        hard = np.flatnonzero(~simple)
        if hard.shape[0]:
            # Buckets with several inserts or none empty: the r-th insert takes the r-th empty
            # slot; inserts past the empties take eligible slots (occupied, not written by this
            # call) by (score, key); the rest are dropped.
            hi = np.flatnonzero(~simple[g])
            hg = np.searchsorted(hard, g[hi])  # row of ``hard`` per insert
            hr = rank[hi]
            fr = free[hard]
            n_free = fr.sum(axis=1)
            hb = ub[hard]
            st = np.take(self._stamp.reshape(-1, _B), hb, axis=0)
            eligible = ~fr & (st != stamp)
            avail = n_free + eligible.sum(axis=1)
            ok[hi] = hr < avail[hg]
            in_empty = hr < n_free[hg]
            e = hi[in_empty]
            if e.shape[0]:
                # the empty slots of every such bucket in slot order, bucket after bucket
                empties = np.flatnonzero(fr) & (_B - 1)
                first_empty = np.cumsum(n_free) - n_free
                local[e] = empties[first_empty[hg[in_empty]] + hr[in_empty]]
            ev = np.flatnonzero(ok[hi] & ~in_empty)
            if ev.shape[0]:
                self._evict_choice(hb, hg[ev], hr[ev] - n_free[hg[ev]], eligible, hi[ev], local)
        if not ok.all():
            c["dropped"] = int(n_miss - np.count_nonzero(ok))
            g, local, rows = g[ok], local[ok], rows[ok]
        s = np.take(ub, g) * _B + local
        n_evicted = int(np.count_nonzero(np.take(self._dig.reshape(-1), s)))
        c["evictions"] = n_evicted
        c["inserted_empty"] = int(s.shape[0]) - n_evicted
        self._ktab.reshape(-1)[s] = np.take(uk, rows)
        self._dig.reshape(-1)[s] = np.take(d, rows)
        return rows, s

    def _evict_choice(
        self,
        hb: np.ndarray,
        rows: np.ndarray,
        nth: np.ndarray,
        eligible: np.ndarray,
        at: np.ndarray,
        local: np.ndarray,
    ) -> None:
        """``local[at[i]]`` = the ``nth[i]``-th eligible slot by (score, key) of bucket
        ``hb[rows[i]]``: one masked minimum over the bucket's 32 scores per round, round ``j``
        serving every bucket's ``j``-th eviction (a few rounds); keys are read only for buckets
        where several eligible slots share the lowest score. A per-bucket 3-key lexsort made
        inserts into a full cache 1.15 us/row."""
        score = np.take(self._score.reshape(-1, _B), hb, axis=0)
        left = eligible.copy()
        top_score, top_key = np.iinfo(np.uint64).max, np.iinfo(np.int64).max
        for j in range(int(nth.max()) + 1):
            this = np.flatnonzero(nth == j)
            r = rows[this]  # distinct: a bucket's j-th eviction is one insert
            whole = 2 * r.shape[0] >= hb.shape[0]  # most buckets (round 0): cheaper than a gather
            if whole:
                at_rows, cand, sc = np.arange(hb.shape[0]), left.copy(), score
            else:
                at_rows, cand, sc = r, np.take(left, r, axis=0), np.take(score, r, axis=0)
            lowest = np.minimum.reduce(sc, axis=1, where=cand, initial=top_score)
            cand &= sc == lowest[:, None]
            pick = cand.argmax(axis=1)
            tied = np.flatnonzero(pick != (_B - 1) - cand[:, ::-1].argmax(axis=1))
            if tied.shape[0]:  # the lowest key among the slots of the lowest score
                k = np.take(self._ktab, hb[at_rows[tied]], axis=0)
                ct = cand[tied]
                first_key = np.minimum.reduce(k, axis=1, where=ct, initial=top_key)
                pick[tied] = (ct & (k == first_key[:, None])).argmax(axis=1)
            if whole:
                pick = pick[r]
            local[at[this]] = pick
            left[r, pick] = False

    def _evict(self, keys: np.ndarray) -> int:
        slot, hit = self._find(np.unique(keys))
        s = slot[hit]
        self._ktab.reshape(-1)[s] = _EMPTY
        self._dig.reshape(-1)[s] = 0
        self._ver[s] = 0
        self._score[s] = 0
        self._stamp[s] = 0
        return int(s.shape[0])

    def _clear(self) -> None:
        self._ktab.fill(_EMPTY)
        self._dig.fill(0)
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
