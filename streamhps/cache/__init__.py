"""Embedding caches: one interface (``EmbeddingCache``), a ``numpy`` and a ``cuda`` backend.

::

    from streamhps.cache import make_cache, memory_estimate
    memory_estimate(1_000_000, 128, "float32", backend="cuda")   # bytes, before allocating
    cache = make_cache("cuda", capacity=1_000_000, dim=128, dtype="float32", policy="lru")
    cache.upsert(keys, vectors, versions)        # newer versions only; inserts evict by score
    values, hit = cache.lookup(keys)             # missed rows are zeros

Semantics and layout are described in ``streamhps.cache.base``. The ``cuda`` backend imports
CuPy only when it is created.
"""

from __future__ import annotations

from typing import Any

from streamhps.cache.base import SLOTS_PER_BUCKET, EmbeddingCache, memory_estimate
from streamhps.errors import CacheError

BACKENDS = ("numpy", "cuda")


def make_cache(
    backend: str,
    capacity: int,
    dim: int,
    dtype: Any = "float32",
    policy: str = "lru",
    **options: Any,
) -> EmbeddingCache:
    """A cache of at least ``capacity`` rows (rounded up to whole buckets of 32 slots).
    ``options``: the cuda backend's ``device`` and ``stream``; the numpy backend's ``memory``
    and ``attach`` (a table in memory another process maps); each ignores the other's."""
    if backend == "numpy":
        from streamhps.cache.numpy_backend import NumpyCache

        return NumpyCache(
            capacity, dim, dtype, policy,
            memory=options.get("memory"), attach=bool(options.get("attach", False)),
        )  # fmt: skip
    if backend == "cuda":
        from streamhps.cache.cuda_backend import CudaCache

        cuda = {k: v for k, v in options.items() if k in ("device", "stream")}
        return CudaCache(capacity, dim, dtype, policy, **cuda)
    raise CacheError(f"unknown cache backend {backend!r}; use one of {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "SLOTS_PER_BUCKET", "EmbeddingCache", "make_cache", "memory_estimate"]
