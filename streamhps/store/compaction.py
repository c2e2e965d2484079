"""Compaction of one write batch: per key, only the row with the highest version is written."""

from __future__ import annotations

import numpy as np

from streamhps.store.base import TableRows


def latest_per_key(rows: TableRows) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Concatenate a table's chunks and keep, per key, the row with the highest version.

    Returns sorted unique keys, their vectors and versions, and the number of rows in.
    """
    keys = np.concatenate(rows.keys) if len(rows.keys) > 1 else np.asarray(rows.keys[0])
    versions = (
        np.concatenate(rows.versions) if len(rows.versions) > 1 else np.asarray(rows.versions[0])
    )
    vectors = np.concatenate(rows.vectors) if len(rows.vectors) > 1 else np.asarray(rows.vectors[0])
    n = keys.shape[0]
    if n < 2 or bool((versions[1:] >= versions[:-1]).all()):
        # the usual case, versions never drop in arrival order: the last occurrence of a key wins
        order = np.argsort(keys, kind="stable")
        k = keys[order]
        last = np.ones(n, dtype=bool)
        last[:-1] = k[1:] != k[:-1]
        pick = order[last]
    else:
        order = np.lexsort((-versions, keys))
        k = keys[order]
        first = np.ones(n, dtype=bool)
        first[1:] = k[1:] != k[:-1]
        pick = order[first]
    return keys[pick], vectors[pick], versions[pick].astype(np.int64), n
