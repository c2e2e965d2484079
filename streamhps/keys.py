"""Keys: what every entry point accepts as ids, and the one way they become int64.

A key is a 64-bit id. Integer arrays of any width are accepted; ``uint64`` ids keep their bit
pattern (viewed as ``int64``), as the publisher writes them, so ``2**64 - 1`` and ``-1`` are the
same key everywhere (publisher, store, worker, server, client).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from streamhps.errors import ValidationError


def as_int64_keys(
    raw: Any, what: str = "keys", error: type[Exception] = ValidationError
) -> np.ndarray:
    """``raw`` as a 1-D ``int64`` array (no copy when it already is one), or ``error`` naming
    ``what`` was wrong. An empty array of any dtype is an empty key array."""
    a = np.asarray(raw)
    if a.ndim != 1 or (a.size and a.dtype.kind not in "iu") or a.dtype == np.bool_:
        raise error(
            f"{what} must be a 1-D array of integer ids (int64), got shape {tuple(a.shape)} "
            f"dtype {a.dtype}"
        )
    if a.dtype == np.uint64:
        return a.view(np.int64)
    return a.astype(np.int64, copy=False)
