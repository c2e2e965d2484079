"""Fixtures for the cache suite: every test runs against both backends (cuda ones are ``gpu``)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from streamhps.cache import EmbeddingCache, make_cache


@pytest.fixture(params=["numpy", pytest.param("cuda", marks=pytest.mark.gpu)])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def new_cache(backend: str) -> Callable[..., EmbeddingCache]:
    def make(capacity: int = 1024, dim: int = 8, dtype: str = "float32", policy: str = "lru"):
        return make_cache(backend, capacity=capacity, dim=dim, dtype=dtype, policy=policy)

    return make
