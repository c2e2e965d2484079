"""Pooled (multi-hot) lookups of the cache, both backends: equal to ``embedding_bag`` on the
resident rows, missed keys adding nothing, one hit flag per key."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cache_helpers import host

from streamhps.errors import CacheError


@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize(
    ("dim", "dtype"),
    [(64, "float32"), (128, "float32"), (5, "float32"), (64, "float16"), (3, "float16")],
)
def test_pooled_lookup_equals_embedding_bag_on_resident_rows(new_cache, dim, dtype, mode):
    rng = np.random.default_rng(dim)
    cache = new_cache(capacity=8192, dim=dim, dtype=dtype)
    keys = rng.choice(1 << 40, size=3000, replace=False).astype(np.int64)
    vals = rng.standard_normal((3000, dim)).astype(dtype)
    cache.upsert(keys, vals, np.ones(3000, np.int64))
    lengths = rng.integers(0, 70, 200)  # bags longer than a warp's 32 keys too
    lengths[::9] = 0
    idx = rng.integers(0, 3100, int(lengths.sum()))  # indices >= 3000: absent keys
    absent = idx >= 3000
    query = np.where(absent, -idx - 1, keys[np.minimum(idx, 2999)])
    offsets = np.concatenate(([0], np.cumsum(lengths)))
    pooled, hit = cache.lookup_pooled(query, offsets, mode)
    pooled, hit = host(pooled), host(hit)
    assert pooled.shape == (200, dim) and pooled.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(hit, ~absent)
    weight = torch.from_numpy(
        np.concatenate([vals.astype(np.float32), np.zeros((100, dim), np.float32)])
    )
    want = torch.nn.functional.embedding_bag(
        torch.from_numpy(idx), weight, torch.from_numpy(offsets[:-1]), mode=mode
    ).numpy()
    # (a missed key adds zeros and still counts in its bag's length, as the worker needs)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == "float32" else {"rtol": 2e-3, "atol": 3e-2}
    np.testing.assert_allclose(pooled.astype(np.float32), want, **tol)
    assert not pooled[lengths == 0].any()
    s = cache.stats()
    assert s["hits"] == int((~absent).sum()) and s["misses"] == int(absent.sum())


def test_pooled_lookup_refuses_bad_offsets(new_cache):
    cache = new_cache(dim=4)
    k = np.arange(6, dtype=np.int64)
    for bad in ([1, 6], [0, 4, 2, 6], [0, 3], [[0, 6]]):
        with pytest.raises(CacheError, match="offsets"):
            cache.lookup_pooled(k, np.array(bad, dtype=np.int64))
    with pytest.raises(CacheError, match="pooling mode"):
        cache.lookup_pooled(k, np.array([0, 6]), "max")
    out, hit = cache.lookup_pooled(np.zeros(0, np.int64), np.array([0, 0, 0]))
    assert host(out).shape == (2, 4) and not host(out).any() and host(hit).shape == (0,)
