"""Helpers of the cache suite (importable as a plain module: tests/ is not a package)."""

from __future__ import annotations

from typing import Any

import numpy as np


def host(a: Any) -> np.ndarray:
    """A numpy copy of a numpy or CuPy array."""
    return np.asarray(a.get()) if hasattr(a, "__cuda_array_interface__") else np.asarray(a)


def rows_for(keys: np.ndarray, versions: np.ndarray, dim: int) -> np.ndarray:
    """Deterministic rows from (key, version): equal versions always carry equal values."""
    base = (keys % 1000).astype(np.float32) * 8 + (versions % 1000).astype(np.float32) / 4
    return (base[:, None] + np.arange(dim, dtype=np.float32)[None, :] / 8).astype(np.float32)
