"""Pooled (multi-hot) lookups: the bag layout of a request, and missed rows added into bags.

The resident rows are pooled by the cache (:meth:`~streamhps.cache.base.EmbeddingCache.lookup_pooled`);
what the cache missed is resolved like any lookup and added in here.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from streamhps.errors import ValidationError
from streamhps.worker.request import array_device


def bag_offsets(
    table: str, offsets: Any, lengths: Any, n_keys: int, include_last: bool = False
) -> np.ndarray:
    """CSR bag boundaries (``n_bags + 1`` int64 entries from 0 to ``n_keys``), on the host."""
    if (offsets is None) == (lengths is None):
        raise ValidationError(
            f"pooled lookup of table {table!r}: pass offsets= or lengths=, not both"
        )
    raw = offsets if offsets is not None else lengths
    if array_device(raw) != "cpu":
        raw = raw.cpu() if hasattr(raw, "cpu") else raw.get()  # one small read of the bag layout
    a = np.asarray(raw)
    what = "offsets" if offsets is not None else "lengths"
    if a.ndim != 1 or (a.size and a.dtype.kind not in "iu"):
        raise ValidationError(
            f"pooled lookup of table {table!r}: {what} must be a 1-D integer array, got shape "
            f"{a.shape} dtype {a.dtype}"
        )
    a = a.astype(np.int64, copy=False)
    if lengths is not None:
        if (a < 0).any() or int(a.sum()) != n_keys:
            raise ValidationError(
                f"pooled lookup of table {table!r}: lengths must be >= 0 and sum to the number "
                f"of keys ({n_keys}), got sum {int(a.sum())}"
            )
        return np.concatenate(([0], np.cumsum(a)))
    if not include_last:
        a = np.concatenate((a, [n_keys]))  # embedding_bag's form: the start of each bag
    if a[0] != 0 or (a[1:] < a[:-1]).any() or a[-1] != n_keys:
        raise ValidationError(
            f"pooled lookup of table {table!r}: offsets must start at 0 and rise to the number "
            f"of keys ({n_keys}) without going back; got {a[:8].tolist()}{'...' if a.size > 8 else ''}"
        )
    return a


def add_missed(xp: Any, pooled: Any, rows: Any, miss: Any, offsets: Any, mode: str) -> None:
    """Add resolved rows of missed keys into their bags (scaled by 1 / length for "mean")."""
    bag = xp.searchsorted(offsets, miss, side="right") - 1
    r = rows.astype(xp.float32)
    if mode == "mean":
        r /= (offsets[bag + 1] - offsets[bag]).astype(xp.float32)[:, None]
    acc = pooled.astype(xp.float32)
    if xp is np:
        np.add.at(acc, bag, r)
    else:
        import cupyx

        cupyx.scatter_add(acc, bag, r)
    pooled[...] = acc.astype(pooled.dtype, copy=False)
