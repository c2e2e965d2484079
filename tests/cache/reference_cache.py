"""A slot-free Python model of the cache semantics in ``streamhps.cache.base`` (one dict per
bucket, one key at a time), for the property tests: slow, obviously right, no digests."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streamhps.cache.base import SLOTS_PER_BUCKET, buckets_for, hash_keys

LOW32 = 0xFFFFFFFF


@dataclass
class Entry:
    version: int
    row: np.ndarray
    score: int
    stamp: int  # clock of the call that last wrote it


class ReferenceCache:
    def __init__(self, capacity: int, dim: int, policy: str = "lru") -> None:
        self.n_buckets = buckets_for(capacity)
        self.dim, self.policy = dim, policy
        self.buckets: list[dict[int, Entry]] = [{} for _ in range(self.n_buckets)]
        self.clock = 0
        self.stats = dict.fromkeys(
            ("hits", "misses", "inserts", "updates", "evictions", "stale_rejected", "dropped"), 0
        )

    def bucket(self, key: int) -> dict[int, Entry]:
        b, _ = hash_keys(np.array([key], dtype=np.int64), self.n_buckets)
        return self.buckets[int(b[0])]

    def __len__(self) -> int:
        return sum(len(b) for b in self.buckets)

    def lookup(self, keys: list[int]) -> tuple[np.ndarray, np.ndarray]:
        self.clock += 1
        out = np.zeros((len(keys), self.dim), dtype=np.float32)
        hit = np.zeros(len(keys), dtype=bool)
        for i, k in enumerate(keys):
            e = self.bucket(k).get(k)
            if e is None:
                continue
            out[i], hit[i] = e.row, True
            if self.policy == "lru":
                e.score = self.clock
            elif (e.score & LOW32) != (self.clock & LOW32):  # once per call
                count = min((e.score >> 32) + 1, LOW32)
                e.score = (count << 32) | (self.clock & LOW32)
        self.stats["hits"] += int(hit.sum())
        self.stats["misses"] += len(keys) - int(hit.sum())
        return out, hit

    def upsert(self, keys: list[int], rows: np.ndarray, versions: list[int], insert: bool) -> int:
        self.clock += 1
        best: dict[int, tuple[int, int]] = {}  # key -> (version, input row): highest, then latest
        for i, (k, v) in enumerate(zip(keys, versions, strict=True)):
            if k not in best or v >= best[k][0]:
                best[k] = (v, i)
        applied = dropped = absent = 0
        missing = sorted(k for k in best if k not in self.bucket(k))  # absent when the call starts
        for k, (v, i) in best.items():  # resident keys first: written, never evicted by this call
            e = self.bucket(k).get(k)
            if e is not None and v > e.version:
                e.version, e.row, e.stamp = v, rows[i].copy(), self.clock
                self.stats["updates"] += 1
                applied += 1
        for k in missing:  # in key order; a stale resident key of this call may be evicted
            bucket = self.bucket(k)
            v, i = best[k]
            if not insert:
                absent += sum(1 for kk in keys if kk == k)
                continue
            if len(bucket) == SLOTS_PER_BUCKET:
                eligible = [kk for kk, e in bucket.items() if e.stamp != self.clock]
                if not eligible:
                    dropped += 1
                    continue
                del bucket[min(eligible, key=lambda kk: (bucket[kk].score, kk))]
                self.stats["evictions"] += 1
            score = self.clock if self.policy == "lru" else (1 << 32) | (self.clock & LOW32)
            bucket[k] = Entry(v, rows[i].copy(), score, self.clock)
            self.stats["inserts"] += 1
            applied += 1
        self.stats["dropped"] += dropped
        self.stats["stale_rejected"] += len(keys) - applied - dropped - absent
        return applied

    def evict(self, keys: list[int]) -> int:
        removed = 0
        for k in set(keys):
            if self.bucket(k).pop(k, None) is not None:
                removed += 1
        return removed

    def versions(self, keys: list[int]) -> list[int]:
        return [e.version if (e := self.bucket(k).get(k)) else 0 for k in keys]
