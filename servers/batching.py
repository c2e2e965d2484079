"""Dynamic batching of predict requests: concurrent requests become one device batch.

As Triton's dynamic batcher: requests wait in one queue; a runner thread takes the oldest and
every queued request of the same consistency behind it, up to ``max_batch_rows`` rows,
concatenates their ids (per table) and dense features, runs ONE lookup of every table and ONE
forward pass, and splits the scores back, in order, to each request. A request waits at most
``max_queue_delay_s`` for others to join its batch, and only while the server is still receiving
other predict requests (:meth:`DynamicBatcher.arriving`): a lone request goes at once. While a
batch runs, the requests that arrive meanwhile queue up and form the next one, so under load
batches grow without any delay at all.

A batch answers with one dense-model version (the runner takes the model reference once per
batch). If a merged batch fails (a key no tier holds, under ``missing = "error"``), its requests
are run again one by one, so each gets its own answer or its own error.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

RunBatch = Callable[[dict[str, np.ndarray], np.ndarray, str], tuple[np.ndarray, int]]


@dataclass(eq=False)  # queued requests are told apart by identity
class _Request:
    ids: Mapping[str, np.ndarray]
    dense: np.ndarray
    consistency: str
    rows: int
    arrived: float
    done: threading.Event = field(default_factory=threading.Event)
    scores: np.ndarray | None = None
    version: int = 0
    error: BaseException | None = None


@dataclass
class BatchStats:
    batches: int = 0
    requests: int = 0
    rows: int = 0
    retried_alone: int = 0
    max_requests_in_batch: int = 0


class DynamicBatcher:
    """Merge concurrent predict requests. ``run(ids, dense, consistency) -> (scores, version)``
    runs one (merged) batch; :meth:`submit` blocks its caller until its own scores are ready.

    ``max_batch_rows``: the most rows one batch takes (a larger request runs alone);
    ``max_queue_delay_s``: the longest a request waits for others while more are arriving;
    ``workers``: runner threads (one keeps one device busy; two overlap one batch's host work
    with another's device work).
    """

    def __init__(
        self,
        run: RunBatch,
        *,
        max_batch_rows: int = 8192,
        max_queue_delay_s: float = 0.001,
        workers: int = 1,
    ) -> None:
        if max_batch_rows < 1 or max_queue_delay_s < 0 or workers < 1:
            raise ValueError(
                "max_batch_rows and workers must be >= 1 and max_queue_delay_s >= 0, got "
                f"{max_batch_rows}, {workers}, {max_queue_delay_s}"
            )
        self.run = run
        self.max_batch_rows = int(max_batch_rows)
        self.max_queue_delay_s = float(max_queue_delay_s)
        self.stats = BatchStats()
        self._queue: deque[_Request] = deque()
        self._cond = threading.Condition()
        self._arriving = 0
        self._closed = False
        self._threads = [
            threading.Thread(target=self._loop, name=f"streamhps-batcher-{i}", daemon=True)
            for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    # ---------------------------------------------------------------- callers

    def arriving(self) -> _Arrival:
        """``with batcher.arriving() as a:`` around parsing a predict request, then
        ``submit(..., arrival=a)`` inside it: while any request is on its way, a queued request
        may wait (up to the delay) for it to join. The arrival ends when its request is queued
        (in the same step) or when the block exits (a request refused while parsing)."""
        return _Arrival(self)

    def submit(
        self,
        ids: Mapping[str, np.ndarray],
        dense: np.ndarray,
        consistency: str = "eventual",
        arrival: _Arrival | None = None,
    ) -> tuple[np.ndarray, int]:
        """Scores of this request (``[n]``) and the dense version that computed them."""
        rows = int(dense.shape[0])
        req = _Request(ids, dense, consistency, rows, time.monotonic())
        with self._cond:
            if arrival is not None:
                arrival.end()
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._queue.append(req)
            self._cond.notify_all()
        req.done.wait()
        if req.error is not None:
            raise req.error
        assert req.scores is not None
        return req.scores, req.version

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for t in self._threads:
            t.join(5)
        for req in list(self._queue):  # none should be left; never leave a caller hanging
            req.error = RuntimeError("the server stopped before this request ran")
            req.done.set()

    # ---------------------------------------------------------------- runners

    def _take(self) -> list[_Request] | None:
        """The next batch (oldest request first), waiting as the delay allows; None: closed."""
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                self._cond.wait()
            while True:
                first = self._queue[0]
                batch: list[_Request] = []
                rows = 0
                for r in self._queue:
                    if r.consistency != first.consistency:
                        continue
                    if batch and rows + r.rows > self.max_batch_rows:
                        break
                    batch.append(r)
                    rows += r.rows
                wait = first.arrived + self.max_queue_delay_s - time.monotonic()
                if rows >= self.max_batch_rows or wait <= 0 or not self._arriving or self._closed:
                    break
                self._cond.wait(wait)
                if not self._queue:  # another runner took them
                    return []
            for r in batch:
                self._queue.remove(r)
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            if batch:
                self._run(batch)

    def _run(self, batch: list[_Request]) -> None:
        s = self.stats
        s.batches += 1
        s.requests += len(batch)
        s.rows += sum(r.rows for r in batch)
        s.max_requests_in_batch = max(s.max_requests_in_batch, len(batch))
        if len(batch) == 1:
            self._run_alone(batch[0])
            return
        try:
            tables = list(batch[0].ids)
            ids = {t: np.concatenate([r.ids[t] for r in batch]) for t in tables}
            dense = np.concatenate([r.dense for r in batch])
            scores, version = self.run(ids, dense, batch[0].consistency)
        except Exception:  # noqa: BLE001 - one request's error must not fail the others
            s.retried_alone += len(batch)
            for r in batch:
                self._run_alone(r)
            return
        start = 0
        for r in batch:
            r.scores, r.version = scores[start : start + r.rows], version
            start += r.rows
            r.done.set()

    def _run_alone(self, r: _Request) -> None:
        try:
            r.scores, r.version = self.run(dict(r.ids), r.dense, r.consistency)
        except BaseException as e:  # noqa: BLE001 - handed to the caller, which raises it
            r.error = e
        r.done.set()


class _Arrival:
    def __init__(self, batcher: DynamicBatcher) -> None:
        self.b = batcher
        self.active = False

    def __enter__(self) -> _Arrival:
        with self.b._cond:
            self.b._arriving += 1
            self.active = True
        return self

    def end(self) -> None:
        """Called under the batcher's lock."""
        if self.active:
            self.active = False
            self.b._arriving -= 1
            self.b._cond.notify_all()

    def __exit__(self, *exc: Any) -> None:
        with self.b._cond:
            self.end()
