"""The shared cache suite: identical semantics for the numpy and cuda backends."""

from __future__ import annotations

import numpy as np
import pytest
from cache_helpers import host, rows_for

from streamhps.cache import make_cache, memory_estimate
from streamhps.errors import CacheError


def i64(*xs: int) -> np.ndarray:
    return np.array(xs, dtype=np.int64)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("dim", [64, 128, 5, 3])
def test_upsert_then_lookup_returns_rows_and_zeros_for_misses(new_cache, dim, dtype):
    cache = new_cache(capacity=4096, dim=dim, dtype=dtype)
    rng = np.random.default_rng(dim)
    keys = rng.choice(1 << 40, size=1000, replace=False).astype(np.int64)
    vals = rng.standard_normal((1000, dim)).astype(dtype)
    assert cache.upsert(keys, vals, np.full(1000, 7)) == 1000
    assert len(cache) == 1000
    query = np.concatenate([keys[::-1], i64(-1, 1 << 41), keys[:3]])
    out, hit = cache.lookup(query)
    out, hit = host(out), host(hit)
    assert out.dtype == np.dtype(dtype) and out.shape == (len(query), dim)
    assert hit.tolist() == [True] * 1000 + [False, False] + [True] * 3
    np.testing.assert_array_equal(out[:1000], vals[::-1])
    np.testing.assert_array_equal(out[1002:], vals[:3])
    assert not out[1000:1002].any()
    s = cache.stats()
    assert (s["hits"], s["misses"], s["inserts"], s["size"]) == (1003, 2, 1000, 1000)


def test_versions_never_go_back(new_cache):
    cache = new_cache(dim=4)
    k = i64(1, 2, 3)
    cache.upsert(k, rows_for(k, i64(5, 5, 5), 4), i64(5, 5, 5))
    # older, equal, newer
    assert cache.upsert(k, np.full((3, 4), 99.0), i64(4, 5, 6)) == 1
    v, hit = cache.get_versions(i64(1, 2, 3, 4))
    assert host(v).tolist() == [5, 5, 6, 0] and host(hit).tolist() == [True, True, True, False]
    out, _ = cache.lookup(k)
    np.testing.assert_array_equal(host(out)[:2], rows_for(k[:2], i64(5, 5), 4))
    assert (host(out)[2] == 99.0).all()
    assert cache.stats()["stale_rejected"] == 2
    assert cache.stats()["updates"] == 1


@pytest.mark.parametrize("order", [[0, 1, 2], [2, 1, 0], [1, 2, 0]])
def test_duplicate_keys_in_one_upsert_highest_version_wins(new_cache, order):
    cache = new_cache(dim=4)
    cache.upsert(i64(9), rows_for(i64(9), i64(1), 4), i64(1))
    keys = i64(7, 7, 7, 9, 9)[order + [3, 4]]
    vers = i64(3, 8, 5, 2, 4)[order + [3, 4]]
    assert cache.upsert(keys, rows_for(keys, vers, 4), vers) == 2  # distinct keys changed
    v, _ = cache.get_versions(i64(7, 9))
    assert host(v).tolist() == [8, 4]
    out, _ = cache.lookup(i64(7, 9))
    np.testing.assert_array_equal(host(out), rows_for(i64(7, 9), i64(8, 4), 4))
    s = cache.stats()
    assert (s["inserts"], s["updates"], s["stale_rejected"], s["size"]) == (2, 1, 3, 2)


def test_update_if_present_never_inserts(new_cache):
    cache = new_cache(dim=4)
    cache.upsert(i64(1, 2), rows_for(i64(1, 2), i64(1, 1), 4), i64(1, 1))
    k, ver = i64(1, 2, 3, 3), i64(2, 1, 5, 6)
    assert cache.update_if_present(k, rows_for(k, ver, 4), ver) == 1
    v, hit = cache.get_versions(i64(1, 2, 3))
    assert host(v).tolist() == [2, 1, 0] and host(hit).tolist() == [True, True, False]
    assert len(cache) == 2
    s = cache.stats()
    assert (s["updates"], s["stale_rejected"], s["inserts"]) == (1, 1, 2)


def test_evict_removes_and_counts_distinct_present_keys(new_cache):
    cache = new_cache(dim=4)
    k = i64(1, 2, 3, 4)
    cache.upsert(k, rows_for(k, i64(1, 1, 1, 1), 4), i64(1, 1, 1, 1))
    assert cache.evict(i64(2, 2, 4, 99)) == 2
    assert len(cache) == 2
    out, hit = cache.lookup(k)
    assert host(hit).tolist() == [True, False, True, False]
    assert not host(out)[[1, 3]].any()
    # an evicted key comes back with any version, since the cache no longer knows it
    assert cache.upsert(i64(2), rows_for(i64(2), i64(1), 4), i64(1)) == 1
    cache.clear()
    assert len(cache) == 0 and not host(cache.lookup(k)[1]).any()


def test_lookup_duplicates_and_integer_key_types(new_cache):
    cache = new_cache(dim=4)
    k = np.array([5, 2**63 - 1, -(2**63)], dtype=np.int64)
    cache.upsert(k, rows_for(k, i64(1, 1, 1), 4), i64(1, 1, 1))
    out, hit = cache.lookup(np.array([5, 5, 5], dtype=np.int32))
    assert host(hit).all() and (host(out) == host(out)[0]).all()
    out, hit = cache.lookup(k.view(np.uint64))
    assert host(hit).all()
    np.testing.assert_array_equal(host(out), rows_for(k, i64(1, 1, 1), 4))
    out, hit = cache.lookup(np.zeros(0, dtype=np.int64))
    assert host(out).shape == (0, 4) and host(hit).shape == (0,)


def test_wrong_input_is_refused_and_changes_nothing(new_cache):
    cache = new_cache(dim=4)
    k = i64(1, 2)
    good = rows_for(k, i64(1, 1), 4)
    with pytest.raises(CacheError, match="shape"):
        cache.upsert(k, np.ones((2, 5), np.float32), i64(1, 1))
    with pytest.raises(CacheError, match="shape"):
        cache.upsert(k, np.ones((3, 4), np.float32), i64(1, 1))
    with pytest.raises(CacheError, match="floating"):
        cache.upsert(k, np.ones((2, 4), np.int32), i64(1, 1))
    with pytest.raises(CacheError, match="versions must be > 0"):
        cache.upsert(k, good, i64(1, 0))
    with pytest.raises(CacheError, match="versions must have shape"):
        cache.upsert(k, good, i64(1))
    with pytest.raises(CacheError, match="integers"):
        cache.upsert(k, good, np.ones(2))
    with pytest.raises(CacheError, match="integers"):
        cache.lookup(np.array([1.0, 2.0]))
    with pytest.raises(CacheError, match="1-D"):
        cache.lookup(np.ones((2, 2), np.int64))
    assert len(cache) == 0 and cache.stats()["inserts"] == 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"capacity": 0}, "capacity"),
        ({"dim": 0}, "dim"),
        ({"dtype": "int8"}, "dtype"),
        ({"dtype": "bfloat17"}, "dtype"),
        ({"policy": "fifo"}, "policy"),
    ],
)
def test_bad_construction_is_refused(backend, kwargs, match):
    args = {"capacity": 64, "dim": 4, "dtype": "float32", "policy": "lru"} | kwargs
    with pytest.raises(CacheError, match=match):
        make_cache(backend, **args)


def test_unknown_backend_is_refused():
    with pytest.raises(CacheError, match="backend"):
        make_cache("tpu", capacity=10, dim=4)
    with pytest.raises(CacheError, match="backend"):
        memory_estimate(10, 4, "float32", backend="tpu")


def test_memory_estimate_matches_what_is_allocated(new_cache, backend):
    cache = new_cache(capacity=1000, dim=64, dtype="float16")
    assert cache.capacity == 1024  # whole buckets of 32
    est = memory_estimate(1000, 64, "float16", backend=backend)
    assert (
        cache.stats()["memory_bytes"]
        == est
        == type(cache).memory_estimate(1000, 64, "float16", backend)
    )
    arrays = [a for a in vars(cache).values() if hasattr(a, "nbytes") and hasattr(a, "shape")]
    assert sum(int(a.nbytes) for a in arrays) == est
    assert memory_estimate(10**6, 128, "float32", backend) > 10**6 * 128 * 4


def test_values_from_the_other_float_width_are_converted(new_cache):
    cache = new_cache(dim=4, dtype="float16")
    cache.upsert(i64(1), np.full((1, 4), 0.5, np.float64), i64(1))
    out, _ = cache.lookup(i64(1))
    assert host(out).dtype == np.float16 and (host(out) == 0.5).all()


@pytest.mark.parametrize("parts", [False, True])
@pytest.mark.parametrize("insert", [True, False])
@pytest.mark.parametrize("dim", [64, 5])
def test_upsert_async_leaves_the_state_upsert_leaves(new_cache, insert, dim, parts):
    """The stream-write path (staged on cuda, in pieces on numpy) equals upsert/update_if_present:
    same rows and versions with duplicate keys and stale rows inside one call and calls of
    several lock pieces; same counters while a call's keys are unique (the worker's case: a
    duplicate split over two pieces counts as two writes). Keys stay well below a bucket per
    call: which of more keys than a bucket holds wins inside one GPU launch is not fixed.
    ``parts``: the rows given as several arrays stacked in order (the worker's messages)."""
    rng = np.random.default_rng(dim + insert)
    a, b = new_cache(capacity=4096, dim=dim), new_cache(capacity=4096, dim=dim)
    b.write_piece_rows = 7  # several pieces per call on the numpy backend
    version = 2
    probe = np.arange(600, dtype=np.int64)
    for unique in (True, False):
        for n in (40, 300, 1, 0, 500):
            keys = rng.permutation(600)[:n] if unique else rng.integers(0, 600, n)
            keys = keys.astype(np.int64)
            vers = version + rng.permutation(n).astype(np.int64)  # no equal-version duplicates
            vals = rng.standard_normal((n, dim)).astype(np.float32)
            version += n + 1
            if not insert:  # something to update
                a.upsert(keys[: n // 2], vals[: n // 2], vers[: n // 2] - 1)
                b.upsert(keys[: n // 2], vals[: n // 2], vers[: n // 2] - 1)
            (a.upsert if insert else a.update_if_present)(keys, vals, vers)
            b.upsert_async(keys, np.array_split(vals, 3) if parts else vals, vers, insert=insert)
            va, ha = a.get_versions(probe)
            vb, hb = b.get_versions(probe)
            np.testing.assert_array_equal(host(ha), host(hb))
            np.testing.assert_array_equal(host(va), host(vb))
            np.testing.assert_array_equal(host(a.lookup(probe)[0]), host(b.lookup(probe)[0]))
            assert len(a) == len(b)
        if unique:
            sa, sb = a.stats(), b.stats()
            for k in ("size", "inserts", "updates", "evictions", "stale_rejected", "dropped"):
                assert sa[k] == sb[k], k


def test_upsert_async_refuses_bad_input_and_changes_nothing(new_cache):
    c = new_cache(dim=4)
    with pytest.raises(CacheError):
        c.upsert_async(i64(1), np.zeros((1, 4), np.float32), i64(0))
    with pytest.raises(CacheError):
        c.upsert_async(i64(1, 2), np.zeros((2, 3), np.float32), i64(1, 1))
    with pytest.raises(CacheError):  # parts that do not add up to one row per key
        c.upsert_async(i64(1, 2), [np.zeros((1, 4), np.float32)] * 3, i64(1, 1))
    assert len(c) == 0
