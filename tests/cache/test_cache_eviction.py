"""Eviction: one bucket (capacity 32) makes the policy global, so results are exact."""

from __future__ import annotations

import numpy as np
import pytest
from cache_helpers import host, rows_for

from streamhps.cache import SLOTS_PER_BUCKET, make_cache

B = SLOTS_PER_BUCKET


def fill(cache, keys, version=1):
    keys = np.asarray(keys, dtype=np.int64)
    vers = np.full(len(keys), version, dtype=np.int64)
    return cache.upsert(keys, rows_for(keys, vers, cache.dim), vers)


def resident(cache, keys):
    return host(cache.get_versions(np.asarray(keys, dtype=np.int64))[1])


def test_lru_evicts_least_recently_used_then_lowest_key(new_cache):
    cache = new_cache(capacity=B, dim=4, policy="lru")
    assert cache.capacity == B
    fill(cache, range(B))
    cache.lookup(np.arange(16))  # 0..15 used after the fill
    assert fill(cache, [100]) == 1
    assert resident(cache, [16]).tolist() == [False]  # oldest score, lowest key
    assert fill(cache, [200, 201]) == 2
    assert resident(cache, [17, 18]).tolist() == [False, False]
    assert resident(cache, range(16)).all() and resident(cache, [100, 200, 201]).all()
    s = cache.stats()
    assert (s["size"], s["evictions"], s["inserts"]) == (B, 3, B + 3)
    out, hit = cache.lookup(np.array([100, 201], dtype=np.int64))
    np.testing.assert_array_equal(host(out), rows_for(np.array([100, 201]), np.array([1, 1]), 4))


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_equal_scores_evict_the_lowest_key_not_the_first_slot(new_cache, policy):
    cache = new_cache(capacity=B, dim=4, policy=policy)
    keys = np.arange(B, 0, -1) * 10  # one call each, descending: slot order is not key order
    for k in keys:
        fill(cache, [k])
    cache.lookup(keys)  # one call: every score equal (lru: its clock; lfu: count 2, its clock)
    assert fill(cache, [7]) == 1
    assert resident(cache, [10, 7]).tolist() == [False, True]
    assert resident(cache, keys[:-1]).all()


def test_updates_do_not_refresh_the_score(new_cache):
    cache = new_cache(capacity=B, dim=4, policy="lru")
    fill(cache, range(B))
    cache.lookup(np.arange(1, B))
    fill(cache, [0], version=5)  # a stream update of key 0: not a use
    fill(cache, [1000])
    assert resident(cache, [0, 1000]).tolist() == [False, True]


def test_lfu_counts_each_key_once_per_lookup(new_cache):
    cache = new_cache(capacity=B, dim=4, policy="lfu")
    fill(cache, range(B))
    cache.lookup(np.arange(B))  # every key: count 1
    cache.lookup(np.array([16, 16, 16]))  # 16: count 2 (once per call)
    cache.lookup(np.arange(17, B))  # 17..31: count 2, more recent than 16
    cache.lookup(np.array([17]))  # 17: count 3
    fill(cache, range(100, 116))  # evicts 0..15 (count 1)
    assert not resident(cache, range(16)).any()
    cache.lookup(np.arange(100, 116))  # new rows start at count 1: lift them to 3
    cache.lookup(np.arange(100, 116))
    fill(cache, [500])  # 16 and 18..31 have count 2; 16 is the least recent
    assert resident(cache, [16, 17, 18, 500]).tolist() == [False, True, True, True]


def test_rows_written_in_a_call_are_not_evicted_by_it_and_overflow_is_dropped(new_cache):
    cache = new_cache(capacity=B, dim=4)
    keys = np.arange(1000, 1000 + B + 8)
    assert fill(cache, keys) == B
    s = cache.stats()
    assert (s["size"], s["dropped"], s["evictions"]) == (B, 8, 0)
    assert int(resident(cache, keys).sum()) == B
    # an update and inserts in one call: the updated row survives the inserts
    present = keys[resident(cache, keys)]
    newer = np.concatenate([present[:1], np.arange(5000, 5000 + B - 1)])
    vers = np.full(len(newer), 2)
    assert cache.upsert(newer, rows_for(newer, vers, 4), vers) == B
    assert resident(cache, newer).all()


@pytest.mark.parametrize("order", ["sorted", "shuffled", "shuffled with repeats"])
def test_numpy_overflow_keeps_the_lowest_keys_in_any_input_order(order):
    """Which rows of an overflowing call a bucket keeps is fixed on numpy (the lowest keys),
    whatever order the rows come in: sorted, unique in arrival order (the worker's pieces of a
    batch without repeats), or with repeats. (The cuda backend does not fix it.)"""
    cache = make_cache("numpy", capacity=B, dim=4)
    keys = np.arange(-20, B + 20, dtype=np.int64) * 7919
    if order != "sorted":
        keys = np.random.default_rng(3).permutation(keys)
    if order == "shuffled with repeats":
        keys = np.concatenate([keys, keys[:5]])
    assert fill(cache, keys) == B
    assert cache.stats()["dropped"] == 40
    kept = np.sort(np.unique(keys))[:B]
    assert resident(cache, kept).all() and len(cache) == B
    # into a full bucket: evictions by (score, key), still the lowest new keys kept
    fresh = np.random.default_rng(4).permutation(np.arange(1, B + 9, dtype=np.int64) * 100_003)
    assert fill(cache, fresh, version=2) == B
    assert resident(cache, np.sort(fresh)[:B]).all() and not resident(cache, kept).any()


def test_stale_update_leaves_key_evictable(new_cache):
    cache = new_cache(capacity=B, dim=4)
    fill(cache, range(B), version=5)
    cache.lookup(np.arange(1, B))
    k = np.array([0, 777])
    vers = np.array([3, 1])  # stale for 0, so 0 is not "written by this call"
    assert cache.upsert(k, rows_for(k, vers, 4), vers) == 1
    assert resident(cache, [0, 777]).tolist() == [False, True]


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_many_buckets_never_exceed_capacity_and_keep_fresh_rows(new_cache, policy):
    cache = new_cache(capacity=512, dim=8, policy=policy)
    rng = np.random.default_rng(1)
    for version in range(1, 31):
        keys = np.unique(rng.integers(0, 5000, size=100))
        vers = np.full(len(keys), version)
        cache.upsert(keys, rows_for(keys, vers, 8), vers)
        assert resident(cache, keys).all()  # just inserted: nothing of this call is evicted
        cache.lookup(rng.integers(0, 5000, size=200))
        assert len(cache) <= cache.capacity
    s = cache.stats()
    assert s["size"] == len(cache) == s["inserts"] - s["evictions"]
    assert s["evictions"] > 0 and s["dropped"] == 0
    out, hit = cache.lookup(np.arange(5000))
    hit = host(hit)
    assert int(hit.sum()) == len(cache)
    v, _ = cache.get_versions(np.arange(5000)[hit])
    np.testing.assert_array_equal(host(out)[hit], rows_for(np.arange(5000)[hit], host(v), 8))
