"""The status page's history: one sample of the server's state per interval, in a ring.

``GET /v1/history`` answers from it and the page (``servers/status_page.py``) draws its charts;
``/metrics`` reads the latest sample for the rates (hit ratio and ingest rows per second).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from servers.metrics import stat

if TYPE_CHECKING:
    from servers.app import InferenceServer

log = logging.getLogger(__name__)


class StatusHistory:
    """The last ``seconds`` of samples, one per ``interval``; rates are taken between samples."""

    def __init__(self, server: InferenceServer, seconds: float, interval: float) -> None:
        self.server = server
        self.interval = interval
        self.samples: deque[dict[str, Any]] = deque(maxlen=int(seconds / interval) + 1)
        self._last: (
            tuple[float, dict[str, float], dict[str, int], dict[str, tuple[float, float]]] | None
        ) = None

    def latest(self) -> dict[str, Any]:
        """The newest sample, ``{}`` before the first."""
        return self.samples[-1] if self.samples else {}

    def sample(self) -> dict[str, Any]:
        now = time.time()
        stal = self.server.staleness()
        stats = self.server.worker.stats() or {}
        per_table = stats.get("tables", stats) if isinstance(stats, dict) else {}
        rows: dict[str, float] = {}
        looked: dict[str, tuple[float, float]] = {}
        for t in self.server.tables:
            ts = per_table.get(t, {}) if isinstance(per_table, dict) else {}
            r = stat(ts, "rows_applied", "rows")
            rows[t] = r if r is not None else 0.0
            looked[t] = (stat(ts, "hits") or 0.0, stat(ts, "misses") or 0.0)
        counters = self.server.counters_snapshot()
        sample: dict[str, Any] = {
            "t": now,
            "ready": bool(self.server.worker.ready()),
            "staleness_s": {
                t: max((p.get("seconds", 0.0) for p in ps.values()), default=0.0)
                for t, ps in stal.items()
            },
            "versions_behind": {
                t: max((p.get("versions_behind", 0) for p in ps.values()), default=0)
                for t, ps in stal.items()
            },
            "applied_version": {
                t: min((p.get("applied_version", 0) or 0 for p in ps.values()), default=0)
                for t, ps in stal.items()
            },
            "hit_ratio": {},
            "ingest_rows_per_s": {},
            "dense_version": self.server.dense_version,
            # publish -> visible to lookups of the worker's recent rows (ms: p50, p99, max, rows;
            # None before any), the freshness a user sees (schemas/README.md, "Freshness")
            "visible_ms": stats.get("apply_latency_ms") if isinstance(stats, dict) else None,
        }
        if self._last is not None:
            t_prev, rows_prev, c_prev, looked_prev = self._last
            dt = max(now - t_prev, 1e-6)
            # hit ratio of the lookups made since the last sample (None when there were none)
            for t, (h, m) in looked.items():
                dh = h - looked_prev.get(t, (0.0, 0.0))[0]
                dm = m - looked_prev.get(t, (0.0, 0.0))[1]
                sample["hit_ratio"][t] = dh / (dh + dm) if dh + dm > 0 else None
            sample["ingest_rows_per_s"] = {
                t: max(0.0, (rows[t] - rows_prev.get(t, 0.0)) / dt) for t in rows
            }
            sample["lookups_per_s"] = (counters["lookups"] - c_prev["lookups"]) / dt
            sample["predicts_per_s"] = (counters["predicts"] - c_prev["predicts"]) / dt
            sample["errors_per_s"] = (counters["errors"] - c_prev["errors"]) / dt
        self._last = (now, rows, counters, looked)
        return sample

    def run(self, stop: threading.Event) -> None:
        """Take a sample every ``interval`` seconds until ``stop`` is set."""
        while not stop.is_set():
            try:
                self.samples.append(self.sample())
            except Exception:  # noqa: BLE001 - a failed sample must not stop the charts
                log.exception("status sample failed")
            stop.wait(self.interval)

    def view(self, seconds: float) -> dict[str, Any]:
        cutoff = time.time() - seconds
        ready = bool(self.server.worker.ready())
        return {
            "ready": ready,
            "reason": None if ready else self.server.worker.not_ready_reason(),
            "max_staleness_s": self.server.config.serving.max_staleness_s,
            "uptime_s": self.server.uptime_s,
            "dense_version": self.server.dense_version,
            "samples": [s for s in list(self.samples) if s["t"] >= cutoff],
        }
