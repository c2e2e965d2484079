"""The miss path: rows a cache did not hold, from the window of recent rows and from LMDB.

Window first, then ONE LMDB read transaction for every table of the request; the higher
version wins (a row consumed but not yet in LMDB is newer than LMDB's); the rows found go back
to the cache as fills; keys no tier holds get the table's ``missing`` policy.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np

from streamhps.errors import StoreError, StreamHPSError
from streamhps.worker.ingest import Fill, TableState
from streamhps.worker.missing import fill_missing

WindowReader = Callable[[dict[str, np.ndarray]], Mapping[str, tuple[int, tuple[Any, ...]]]]


class FillSink(Protocol):
    """Where fills go: the ingest thread's queue, or the ingest process."""

    def put(self, fill: Fill) -> None: ...


def window_rows(
    tables: Mapping[str, TableState], keys: Mapping[str, np.ndarray]
) -> dict[str, tuple[int, tuple[Any, ...]]]:
    """table -> (the window's epoch, (vectors, versions, found)) of unique ``keys``: the epoch
    read before the rows, so that a prune after this point drops the fill made from them."""
    out: dict[str, tuple[int, tuple[Any, ...]]] = {}
    for t, k in keys.items():
        window = tables[t].window
        epoch = window.epoch
        out[t] = (epoch, window.get(k))
    return out


def resolve_misses(
    missed: dict[str, np.ndarray],
    counts: dict[str, int],
    tables: Mapping[str, TableState],
    store: Any,
    fills: FillSink | None,
    read_windows: WindowReader | None = None,
) -> dict[str, np.ndarray]:
    """Rows of missed keys of several tables (``table -> keys``, duplicates allowed; rows in
    the same order): window first, then ONE LMDB read transaction for every table, the
    higher version wins; ``fills`` for the cache (the ingest thread inserts them); then each
    table's ``missing`` policy. ``counts`` gains where the rows came from.

    ``read_windows``: table -> (epoch, window rows) of unique keys, where the windows live in
    another process (:mod:`streamhps.worker.ingest_process`); default: ``tables``' windows."""
    uniq: dict[str, tuple[np.ndarray, np.ndarray]] = {
        t: np.unique(k, return_inverse=True) for t, k in missed.items()
    }
    unique = {t: u for t, (u, _) in uniq.items()}
    read = window_rows(tables, unique) if read_windows is None else read_windows(unique)
    epochs = {t: read[t][0] for t in uniq}
    windows = {t: read[t][1] for t in uniq}
    try:
        stored = store.get_many({t: u for t, (u, _) in uniq.items()})
    except StoreError as e:
        raise StoreError(f"miss path of table(s) {sorted(uniq)}: {e}") from e
    out: dict[str, np.ndarray] = {}
    refusal: Exception | None = None
    for t, (keys, inverse) in uniq.items():
        st = tables[t]
        wv, wver, wfound = windows[t]
        if t in stored:  # absent: the processor has not written this table yet
            lv, lver, lfound = stored[t]
        else:
            lv, lver, lfound = (
                np.zeros_like(wv),
                np.zeros_like(wver),
                np.zeros(keys.shape[0], bool),
            )
        use_window = wfound & (~lfound | (wver >= lver))
        found = wfound | lfound
        rows = np.where(use_window[:, None], wv, lv)
        versions = np.where(use_window, wver, lver)
        counts["from_window"] = counts.get("from_window", 0) + int(np.count_nonzero(use_window))
        counts["from_store"] = counts.get("from_store", 0) + int(
            np.count_nonzero(found & ~use_window)
        )
        counts["window_over_store"] = counts.get("window_over_store", 0) + int(
            np.count_nonzero(use_window & lfound & (wver > lver))
        )
        if found.any() and fills is not None:
            fills.put(
                Fill(t, keys[found], np.ascontiguousarray(rows[found]), versions[found].copy(), epochs[t])
            )  # fmt: skip
        if not found.all():
            absent = ~found
            counts["from_missing"] = counts.get("from_missing", 0) + int(np.count_nonzero(absent))
            try:
                rows[absent] = fill_missing(
                    t, st.spec.missing, keys[absent], st.spec.dim, st.spec.np_dtype
                )
            except StreamHPSError as e:  # every table's fills go out first
                refusal = refusal or e
        out[t] = rows[inverse]
    if refusal is not None:
        raise refusal
    return out
