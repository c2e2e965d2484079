"""Keys that share a bucket and a digest (the one-byte fingerprint a probe compares before the
key): every operation still tells them apart. Both backends against ``ReferenceCache``, a
dict-per-bucket model of the semantics in ``streamhps.cache.base``, on a two-bucket cache where
evictions and digest collisions are the common case."""

from __future__ import annotations

import numpy as np
import pytest
from cache_helpers import host
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference_cache import ReferenceCache

from streamhps.cache import make_cache
from streamhps.cache.base import buckets_for, hash_keys

CAPACITY, DIM = 64, 4
N_BUCKETS = buckets_for(CAPACITY)


def collision_pool() -> list[int]:
    """12 keys of one (bucket, digest), 26 more of that bucket with other digests (more than its
    32 slots: inserts evict), 10 of the other bucket, the int64 extremes (the smallest is the
    key the numpy table stores in empty slots) and -1."""
    cand = np.arange(-50_000, 50_000, dtype=np.int64)
    b, d = hash_keys(cand, N_BUCKETS)
    same = cand[(b == b[0]) & (d == d[0])][:12]
    other_digest = cand[(b == b[0]) & (d != d[0])][:26]
    other_bucket = cand[b != b[0]][:10]
    extremes = [-(2**63), 2**63 - 1, -1]
    return [int(k) for k in (*same, *other_digest, *other_bucket)] + extremes


POOL = collision_pool()
KEY = st.integers(0, len(POOL) - 1)  # an index into POOL


def test_the_pool_holds_keys_of_one_bucket_and_one_digest():
    b, d = hash_keys(np.array(POOL, dtype=np.int64), N_BUCKETS)
    assert len(set(zip(b[:12].tolist(), d[:12].tolist(), strict=True))) == 1
    assert len(set(POOL)) == len(POOL)


def ops(max_batch: int) -> st.SearchStrategy:
    batch = st.lists(st.tuples(KEY, st.integers(1, 6)), max_size=max_batch)
    return st.lists(
        st.one_of(
            st.tuples(st.just("upsert"), batch),
            st.tuples(st.just("update_if_present"), batch),
            st.tuples(st.just("evict"), st.lists(KEY, max_size=6)),
            st.tuples(st.just("lookup"), st.lists(KEY, max_size=40)),
        ),
        min_size=1,
        max_size=40,
    )


def row_of(idx: np.ndarray, versions: np.ndarray) -> np.ndarray:
    """One row per (key, version): equal versions of a key carry equal rows."""
    base = (idx * 16 + versions).astype(np.float32)
    return base[:, None] + np.arange(DIM, dtype=np.float32)[None, :] / 8


# 30 keys of the first bucket (two writes of 15): later inserts there soon evict
PREFILL = [("upsert", [(i, 1) for i in range(j, 30, 2)]) for j in (0, 1)]


def run_against_reference(cache, ops_) -> None:
    ref = ReferenceCache(CAPACITY, DIM, cache.policy)
    for op, arg in PREFILL + ops_:
        if op in ("upsert", "update_if_present"):
            idx = np.array([i for i, _ in arg], dtype=np.int64)
            vers = np.array([v for _, v in arg], dtype=np.int64)
            keys = np.array([POOL[i] for i in idx], dtype=np.int64)
            rows = row_of(idx, vers)
            want = ref.upsert(keys.tolist(), rows, vers.tolist(), insert=op == "upsert")
            assert getattr(cache, op)(keys, rows, vers) == want, (op, arg)
        elif op == "evict":
            keys = [POOL[i] for i in arg]
            assert cache.evict(np.array(keys, dtype=np.int64)) == ref.evict(keys), arg
        else:
            keys = [POOL[i] for i in arg]
            out, hit = cache.lookup(np.array(keys, dtype=np.int64))
            want_out, want_hit = ref.lookup(keys)
            assert host(hit).tolist() == want_hit.tolist(), arg
            np.testing.assert_array_equal(host(out), want_out)
        assert len(cache) == len(ref)
    v, hit = cache.get_versions(np.array(POOL, dtype=np.int64))
    want_v = ref.versions(POOL)
    assert host(v).tolist() == want_v
    assert host(hit).tolist() == [x > 0 for x in want_v]
    s = cache.stats()
    assert {k: s[k] for k in ref.stats} == ref.stats


FUZZ = settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@FUZZ
@given(ops_=ops(max_batch=16), policy=st.sampled_from(["lru", "lfu"]))
def test_colliding_keys_match_the_reference(backend, ops_, policy):
    """At most 16 rows per write: a bucket of 32 never runs out of slots inside one call, where
    the cuda backend does not fix which rows win."""
    run_against_reference(make_cache(backend, capacity=CAPACITY, dim=DIM, policy=policy), ops_)


@FUZZ
@given(ops_=ops(max_batch=48), policy=st.sampled_from(["lru", "lfu"]))
def test_numpy_drops_and_evictions_match_the_reference(ops_, policy):
    """Writes of more keys than a bucket holds: the numpy backend keeps the lowest keys of a
    bucket and drops the rest, as the reference does."""
    run_against_reference(make_cache("numpy", capacity=CAPACITY, dim=DIM, policy=policy), ops_)


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_a_key_whose_digest_matches_a_resident_key_is_absent(new_cache, policy):
    cache = new_cache(capacity=CAPACITY, dim=DIM, policy=policy)
    a, b, c = (np.array([k], dtype=np.int64) for k in POOL[:3])  # one bucket, one digest
    one, two = np.array([1]), np.array([1, 1])
    assert cache.upsert(np.concatenate([a, c]), row_of(np.array([0, 2]), two), two) == 2
    out, hit = cache.lookup(np.concatenate([b, c, a]))
    assert host(hit).tolist() == [False, True, True]
    np.testing.assert_array_equal(host(out)[0], 0)
    np.testing.assert_array_equal(host(out)[1:], row_of(np.array([2, 0]), two))
    assert cache.update_if_present(b, row_of(np.array([1]), one), one) == 0
    assert cache.evict(b) == 0 and cache.evict(a) == 1
    _, hit = cache.lookup(np.concatenate([a, b, c]))
    assert host(hit).tolist() == [False, False, True]
