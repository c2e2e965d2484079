"""Embedding tables a user puts in their own torch model, served by an inference worker.

::

    from streamhps.models import StreamingEmbedding, StreamingEmbeddingBag, StreamingEmbeddings

    user = StreamingEmbedding(worker, "user")            # like nn.Embedding, rows from the stream
    vecs = user(torch.tensor([3, 17, 42]))               # [3, dim] on the worker's device
    tags = StreamingEmbeddingBag(worker, "tag", mode="mean")
    pooled = tags(tag_ids, offsets)                      # like nn.EmbeddingBag: [n_bags, dim]
    both = StreamingEmbeddings(worker, ["user", "item"])
    rows = both({"user": u, "item": i})                  # one lookup_many for every table

They are the inference-side counterpart of :class:`streamhps.Publisher`: the trainer publishes
rows, the worker keeps them fresh in its cache (GPU or CPU), and these modules read them with
no gradient and no parameters of their own (``state_dict()`` is empty: the stream is the state).
Output lives on the worker's device (a cuda worker hands torch tensors over by DLPack, no copy)
and has the table's dtype. ``consistency="bounded"`` makes every forward a bounded read (a
:class:`~streamhps.errors.StaleReadError` past ``serving.max_staleness_s``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn


def _tensor(a: Any) -> torch.Tensor:
    return torch.from_numpy(a) if isinstance(a, np.ndarray) else a


class _Streaming(nn.Module):
    def __init__(self, worker: Any, consistency: str, timeout: float | None) -> None:
        super().__init__()
        self.worker = worker
        self.consistency = consistency
        self.timeout = timeout

    def _spec(self, table: str) -> Any:
        return next(t for t in self.worker.config.tables if t.name == table)


class StreamingEmbedding(_Streaming):
    """``nn.Embedding`` of one table of ``worker``: ``forward(keys)`` -> ``[*keys.shape, dim]``."""

    def __init__(
        self, worker: Any, table: str, consistency: str = "eventual", timeout: float | None = None
    ) -> None:
        super().__init__(worker, consistency, timeout)
        self.table = table
        self.embedding_dim = int(self._spec(table).dim)

    def forward(self, keys: torch.Tensor) -> torch.Tensor:
        flat = keys.reshape(-1) if keys.dim() != 1 else keys
        with torch.no_grad():
            rows = self.worker.lookup_many(
                {self.table: flat}, consistency=self.consistency, timeout=self.timeout
            )[self.table]
        return _tensor(rows).reshape(*keys.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"table={self.table!r}, dim={self.embedding_dim}, consistency={self.consistency!r}"


class StreamingEmbeddingBag(_Streaming):
    """``nn.EmbeddingBag`` of one table (``mode`` "sum" or "mean"): ``forward(input, offsets)``
    with 1-D ``input`` and the start of each bag in ``offsets``, or a 2-D ``input`` of equal bags;
    pooled on the worker (one fused kernel on a cuda worker) -> ``[n_bags, dim]``."""

    def __init__(
        self,
        worker: Any,
        table: str,
        mode: str = "sum",
        consistency: str = "eventual",
        timeout: float | None = None,
        include_last_offset: bool = False,
    ) -> None:
        super().__init__(worker, consistency, timeout)
        self.table = table
        self.mode = mode
        self.include_last_offset = include_last_offset
        self.embedding_dim = int(self._spec(table).dim)

    def forward(self, input: torch.Tensor, offsets: torch.Tensor | None = None) -> torch.Tensor:  # noqa: A002 - nn.EmbeddingBag's name
        if input.dim() == 2:
            if offsets is not None:
                raise ValueError("offsets must be None when input is 2-D (bags of equal length)")
            n, length = input.shape
            lengths = np.full(n, length, dtype=np.int64)
            return self._pooled(input.reshape(-1), lengths=lengths)
        if offsets is None:
            raise ValueError("offsets are required when input is 1-D")
        return self._pooled(input, offsets=offsets)

    def _pooled(self, keys: torch.Tensor, **bags: Any) -> torch.Tensor:
        with torch.no_grad():
            out = self.worker.lookup_pooled(
                self.table, keys, mode=self.mode, consistency=self.consistency,
                timeout=self.timeout, include_last_offset=self.include_last_offset, **bags,
            )  # fmt: skip
        return _tensor(out)

    def extra_repr(self) -> str:
        return f"table={self.table!r}, dim={self.embedding_dim}, mode={self.mode!r}"


class StreamingEmbeddings(_Streaming):
    """Several tables at once: ``forward({table: keys})`` -> ``{table: rows}`` through ONE
    ``worker.lookup_many`` (one synchronisation, misses of every table resolved together)."""

    def __init__(
        self,
        worker: Any,
        tables: Sequence[str],
        consistency: str = "eventual",
        timeout: float | None = None,
    ) -> None:
        super().__init__(worker, consistency, timeout)
        self.tables = tuple(tables)
        self.dims = {t: int(self._spec(t).dim) for t in self.tables}

    def forward(self, keys: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        unknown = sorted(set(keys) - set(self.tables))
        if unknown:
            raise KeyError(f"tables {unknown} are not in this module's {list(self.tables)}")
        flat = {t: k.reshape(-1) for t, k in keys.items()}
        with torch.no_grad():
            rows = self.worker.lookup_many(flat, consistency=self.consistency, timeout=self.timeout)
        return {t: _tensor(rows[t]).reshape(*keys[t].shape, self.dims[t]) for t in keys}

    def extra_repr(self) -> str:
        return f"tables={list(self.tables)}, consistency={self.consistency!r}"
