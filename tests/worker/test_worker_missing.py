"""The missing-key policies."""

from __future__ import annotations

import numpy as np
import pytest

from streamhps.errors import MissingKeyError
from streamhps.worker.missing import fill_missing, init_vectors


def test_init_vectors_are_deterministic_per_key_and_small() -> None:
    keys = np.array([1, 2, 3, -7, 2**62], dtype=np.int64)
    a = init_vectors(keys, 64, seed=7)
    b = init_vectors(keys[::-1], 64, seed=7)[::-1]
    np.testing.assert_array_equal(a, b)  # a key's vector does not depend on its neighbours
    assert a.dtype == np.float32 and a.shape == (5, 64)
    assert not np.array_equal(a, init_vectors(keys, 64, seed=8))
    big = init_vectors(np.arange(20000), 16, seed=1)
    assert abs(float(big.mean())) < 1e-3
    assert 0.009 < float(big.std()) < 0.011
    assert init_vectors(keys, 4, 7, "float16").dtype == np.float16


def test_zeros_and_error_policies() -> None:
    keys = np.arange(20, dtype=np.int64)
    assert not fill_missing("user", "zeros", keys, 4, np.dtype(np.float32)).any()
    with pytest.raises(MissingKeyError, match=r"20 key\(s\).*0, 1, 2.*and 12 more"):
        fill_missing("user", "error", keys, 4, np.dtype(np.float32))
