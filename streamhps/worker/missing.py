"""What a lookup returns for a key that no tier holds: the table's ``missing`` policy.

* ``"error"``: raise :class:`~streamhps.errors.MissingKeyError` naming the first keys.
* ``"zeros"``: zero vectors.
* ``"init:<seed>"``: a deterministic pseudo-random vector per key, identical in every process
  and language. Element ``j`` of key ``k``'s vector is ``0.01 * z`` where ``z`` is a standard
  normal from the Box-Muller transform of two uniforms ``u1, u2`` in (0, 1]::

      h  = fmix64(fmix64(uint64(k) ^ fmix64(seed)) + j)          (mod 2**64)
      u1 = ((h >> 11) + 1) / 2**53 ;  u2 = ((fmix64(h) >> 11) + 1) / 2**53
      z  = sqrt(-2 ln u1) * cos(2 pi u2)

  ``fmix64`` is the MurmurHash3 finalizer of :mod:`streamhps.partitioning`.
"""

from __future__ import annotations

import numpy as np

from streamhps.errors import MissingKeyError
from streamhps.partitioning import fmix64

INIT_SCALE = 0.01
_SHOWN = 8


def init_vectors(
    keys: np.ndarray, dim: int, seed: int, dtype: np.dtype | str = "float32"
) -> np.ndarray:
    """The ``init:<seed>`` vectors of ``keys``: ``[n, dim]`` of ``dtype``, deterministic per key."""
    seed_mix = fmix64(np.array([seed], dtype=np.int64).view(np.uint64).view(np.int64))[0]
    base = fmix64((np.asarray(keys, dtype=np.int64).view(np.uint64) ^ seed_mix).view(np.int64))
    with np.errstate(over="ignore"):
        h = base[:, None] + np.arange(dim, dtype=np.uint64)[None, :]
    h1 = fmix64(h.view(np.int64))
    h2 = fmix64(h1.view(np.int64))
    u1 = ((h1 >> np.uint64(11)).astype(np.float64) + 1.0) / 2.0**53
    u2 = ((h2 >> np.uint64(11)).astype(np.float64) + 1.0) / 2.0**53
    z = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
    return (INIT_SCALE * z).astype(dtype)


def fill_missing(
    table: str, policy: str, keys: np.ndarray, dim: int, dtype: np.dtype
) -> np.ndarray:
    """Vectors for ``keys`` that no tier holds, by ``policy``; raises for ``"error"``."""
    if policy == "zeros":
        return np.zeros((keys.shape[0], dim), dtype=dtype)
    if policy.startswith("init:"):
        return init_vectors(keys, dim, int(policy[5:]), dtype)
    shown = ", ".join(str(int(k)) for k in keys[:_SHOWN])
    more = f" and {keys.shape[0] - _SHOWN} more" if keys.shape[0] > _SHOWN else ""
    raise MissingKeyError(
        f"table {table!r}: {keys.shape[0]} key(s) were never published: {shown}{more}. "
        "The table's missing policy is 'error'; set missing = 'zeros' or 'init:<seed>' to serve a default"
    )
