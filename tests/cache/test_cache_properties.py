"""Property tests: random operation sequences against a dict oracle (no eviction possible),
a reader/writer race, and (on a GPU) the two backends side by side with eviction."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from cache_helpers import host, rows_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamhps.cache import make_cache

DIM = 4
KEYS = st.one_of(st.integers(0, 200), st.sampled_from([-1, -(2**63), 2**63 - 1, 2**40]))
BATCH = st.lists(st.tuples(KEYS, st.integers(1, 12)), min_size=0, max_size=25)
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("upsert"), BATCH),
        st.tuples(st.just("update_if_present"), BATCH),
        st.tuples(st.just("evict"), st.lists(KEYS, max_size=10)),
        st.tuples(st.just("lookup"), st.lists(KEYS, max_size=30)),
    ),
    min_size=1,
    max_size=25,
)


def run_against_oracle(cache, ops) -> None:
    oracle: dict[int, int] = {}  # key -> version
    for op, arg in ops:
        if op in ("upsert", "update_if_present"):
            keys = np.array([k for k, _ in arg], dtype=np.int64)
            vers = np.array([v for _, v in arg], dtype=np.int64)
            best: dict[int, int] = {}
            for k, v in zip(keys.tolist(), vers.tolist(), strict=True):
                best[k] = max(v, best.get(k, 0))
            changed = 0
            for k, v in best.items():
                if (op == "upsert" or k in oracle) and v > oracle.get(k, 0):
                    oracle[k] = v
                    changed += 1
            got = getattr(cache, op)(keys, rows_for(keys, vers, DIM), vers)
            assert got == changed, (op, arg)
        elif op == "evict":
            present = {k for k in arg if k in oracle}
            for k in present:
                del oracle[k]
            assert cache.evict(np.array(arg, dtype=np.int64)) == len(present)
        else:
            keys = np.array(arg, dtype=np.int64)
            out, hit = cache.lookup(keys)
            want_hit = np.array([k in oracle for k in arg], dtype=bool)
            assert host(hit).tolist() == want_hit.tolist()
            want_v = np.array([oracle.get(k, 0) for k in arg], dtype=np.int64)
            want = rows_for(keys, want_v, DIM) * want_hit[:, None]
            np.testing.assert_array_equal(host(out), want)
        assert len(cache) == len(oracle)
    keys = np.array(sorted(oracle), dtype=np.int64)
    v, hit = cache.get_versions(keys)
    assert host(hit).all() and host(v).tolist() == [oracle[k] for k in keys.tolist()]
    assert cache.stats()["evictions"] == 0


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=OPS, policy=st.sampled_from(["lru", "lfu"]))
def test_matches_a_dict_oracle(backend, ops, policy):
    cache = make_cache(backend, capacity=8192, dim=DIM, policy=policy)
    run_against_oracle(cache, ops)


@pytest.mark.parametrize("write", ["upsert", "upsert_async"])
def test_concurrent_lookups_never_see_half_written_rows(new_cache, write):
    """Also through the stream writer's pieces (on the numpy backend they enter the table's
    gate inside their compiled call, as lookups do)."""
    dim = 256
    cache = new_cache(capacity=4096, dim=dim)
    keys = np.arange(2000, dtype=np.int64)
    stop = threading.Event()
    errors: list[str] = []

    def writer() -> None:
        for version in range(1, 60):
            vals = np.full((len(keys), dim), float(version), dtype=np.float32)
            getattr(cache, write)(keys, vals, np.full(len(keys), version))
        stop.set()

    def reader() -> None:
        seen = 0
        while not stop.is_set() or seen == 0:
            out, hit = cache.lookup(keys)
            out, hit = host(out), host(hit)
            rows = out[hit]
            torn = (rows != rows[:, :1]).any(axis=1)
            if torn.any():
                errors.append(f"{int(torn.sum())} rows mixed two versions")
                return
            seen += 1

    threads = [threading.Thread(target=writer)] + [
        threading.Thread(target=reader) for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    v, hit = cache.get_versions(keys)
    assert host(hit).all() and (host(v) == 59).all()


@pytest.mark.gpu
def test_cuda_request_path_lookups_beside_a_stream_writer():
    """``lookup_into`` (the worker's request path) enqueues without the cache's lock: from three
    threads beside a stream writer its rows are never half-written, a reader never sees a key's
    version go back, and every position it looked up is counted (hits + misses)."""
    import cupy as cp

    dim, n = 256, 2000
    cache = make_cache("cuda", capacity=4096, dim=dim)
    keys = np.arange(n, dtype=np.int64)
    cache.upsert(keys, np.ones((n, dim), np.float32), np.ones(n, np.int64))
    stop = threading.Event()
    errors: list[str] = []
    looked_up = [0, 0, 0]

    def writer() -> None:
        for version in range(2, 60):
            vals = np.full((n, dim), float(version), dtype=np.float32)
            cache.upsert_async(keys, vals, np.full(n, version))
        stop.set()

    def reader(i: int) -> None:
        kd = cp.asarray(keys[i::2])  # evens, odds, evens again from 2
        out = cp.empty((kd.shape[0], dim), dtype=cp.float32)
        hit = cp.empty(kd.shape[0], dtype=cp.bool_)
        last = np.zeros(kd.shape[0], dtype=np.float32)
        while not stop.is_set() or looked_up[i] == 0:
            with cache.stream:
                cache.lookup_into(kd, out, hit)
                rows, h = out.get(), hit.get()
            looked_up[i] += kd.shape[0]
            if not h.all() or (rows != rows[:, :1]).any() or (rows[:, 0] < last).any():
                errors.append("a missing, half-written or older row")
                return
            last = rows[:, 0]

    threads = [threading.Thread(target=writer)] + [
        threading.Thread(target=reader, args=(i,)) for i in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    s = cache.stats()
    assert s["hits"] + s["misses"] == sum(looked_up)
    v, hit = cache.get_versions(keys)
    assert host(hit).all() and (host(v) == 59).all()


@pytest.mark.gpu
@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_cuda_and_numpy_agree_under_eviction(policy):
    rng = np.random.default_rng(7)
    caches = [make_cache(b, capacity=256, dim=16, policy=policy) for b in ("numpy", "cuda")]
    for step in range(1, 200):
        keys = rng.integers(0, 3000, size=rng.integers(1, 24)).astype(np.int64)
        vers = rng.integers(1, step + 1, size=len(keys)).astype(np.int64)
        if rng.random() < 0.6:
            got = [c.upsert(keys, rows_for(keys, vers, 16), vers) for c in caches]
        elif rng.random() < 0.5:
            got = [c.lookup(keys)[1].sum().item() for c in caches]
        elif rng.random() < 0.5:
            got = [c.update_if_present(keys, rows_for(keys, vers, 16), vers) for c in caches]
        else:
            got = [c.evict(keys[:3]) for c in caches]
        assert got[0] == got[1], step
    probe = np.arange(3000, dtype=np.int64)
    (a, ha), (b, hb) = (c.lookup(probe) for c in caches)
    np.testing.assert_array_equal(host(ha), host(hb))
    np.testing.assert_array_equal(host(a), host(b))
    sa, sb = (c.stats() for c in caches)
    for field in ("size", "hits", "misses", "inserts", "updates", "evictions", "stale_rejected"):
        assert sa[field] == sb[field], field
