"""Prometheus metrics of the inference server (``GET /metrics``): latency histograms and the
text rendering of the worker's staleness, cache, ingest and request counters."""

from __future__ import annotations

import bisect
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from servers.app import InferenceServer

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class Histogram:
    """A Prometheus histogram (cumulative buckets), thread-safe."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0
        self._lock = threading.Lock()

    def observe(self, v: float) -> None:
        i = bisect.bisect_left(self.buckets, v)
        with self._lock:
            self.counts[i] += 1
            self.sum += v
            self.count += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        with self._lock:
            counts, total, n = list(self.counts), self.sum, self.count
        out, acc = [], 0
        sep = "," if labels else ""
        for le, c in zip((*self.buckets, float("inf")), counts, strict=True):
            acc += c
            le_s = "+Inf" if le == float("inf") else repr(le)
            out.append(f'{name}_bucket{{{labels}{sep}le="{le_s}"}} {acc}')
        out.append(f"{name}_sum{{{labels}}} {total}" if labels else f"{name}_sum {total}")
        out.append(f"{name}_count{{{labels}}} {n}" if labels else f"{name}_count {n}")
        return out


def stat(d: Any, *names: str) -> float | None:
    """First of ``names`` found in a (possibly nested) stats dict, summed over nesting."""
    if not isinstance(d, dict):
        return None
    for n in names:
        if n in d and isinstance(d[n], (int, float)) and not isinstance(d[n], bool):
            return float(d[n])
    found = [
        v for v in (stat(x, *names) for x in d.values() if isinstance(x, dict)) if v is not None
    ]
    return float(sum(found)) if found else None


def render_metrics(server: InferenceServer) -> str:
    """The server's state in the Prometheus text format (``GET /metrics``)."""
    lines: list[str] = []

    def family(name: str, kind: str, help_: str) -> None:
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")

    stal = server.staleness()
    for key, name, help_ in (
        (
            "seconds",
            "streamhps_staleness_seconds",
            "Seconds behind the stream head (publish time of the oldest unapplied message).",
        ),
        (
            "versions_behind",
            "streamhps_staleness_versions",
            "Committed versions not yet applied.",
        ),
        ("applied_version", "streamhps_applied_version", "Last commit marker fully applied."),
        (
            "lag_messages",
            "streamhps_lag_messages",
            "Messages between the worker's position and the head.",
        ),
    ):
        family(name, "gauge", help_)
        for t, parts in stal.items():
            for p, v in parts.items():
                val = v.get(key)
                if val is not None:
                    lines.append(f'{name}{{table="{t}",partition="{p}"}} {float(val)}')
    family("streamhps_ready", "gauge", "1 when within the staleness bound.")
    lines.append(f"streamhps_ready {int(bool(server.worker.ready()))}")
    last = server.history.latest()
    family("streamhps_cache_hit_ratio", "gauge", "Cache hits / lookups.")
    for t, h in (last.get("hit_ratio") or {}).items():
        if h is not None:
            lines.append(f'streamhps_cache_hit_ratio{{table="{t}"}} {h}')
    stats = server.worker.stats() or {}
    per_table = stats.get("tables", {}) if isinstance(stats, dict) else {}
    family("streamhps_cache_lookups_total", "counter", "Keys looked up in the cache, by result.")
    for t in server.tables:
        ts = per_table.get(t, {})
        for key, result in (("hits", "hit"), ("misses", "miss")):
            n = stat(ts, key)
            if n is not None:
                lines.append(
                    f'streamhps_cache_lookups_total{{table="{t}",result="{result}"}} {int(n)}'
                )
    family("streamhps_ingest_rows_total", "counter", "Rows applied from the stream.")
    for t in server.tables:
        n = stat(per_table.get(t, {}), "rows_applied")
        if n is not None:
            lines.append(f'streamhps_ingest_rows_total{{table="{t}"}} {int(n)}')
    family("streamhps_ingest_rows_per_second", "gauge", "Rows applied from the stream per second.")
    for t, r in (last.get("ingest_rows_per_s") or {}).items():
        lines.append(f'streamhps_ingest_rows_per_second{{table="{t}"}} {r}')
    rejected = stats.get("rejected") if isinstance(stats, dict) else None
    family(
        "streamhps_rejected_messages_total", "counter",
        "Messages the worker skipped (the processor dead-letters them), by reason.",
    )  # fmt: skip
    for reason, n in sorted(((rejected or {}).get("by_reason") or {}).items()):
        lines.append(f'streamhps_rejected_messages_total{{reason="{reason}"}} {int(n)}')
    family("streamhps_lookup_latency_seconds", "histogram", "Worker lookup latency per request.")
    for t, h in server.latency.items():
        lines.extend(h.lines("streamhps_lookup_latency_seconds", f'table="{t}"'))
    family("streamhps_predict_latency_seconds", "histogram", "Predict request latency.")
    lines.extend(server.predict_latency.lines("streamhps_predict_latency_seconds"))
    family("streamhps_dense_version", "gauge", "Version of the dense model in service (0: none).")
    lines.append(f"streamhps_dense_version {server.dense_version or 0}")
    httpd = server.httpd
    family("streamhps_http_connections", "gauge", "Connections holding a handler thread now.")
    lines.append(f"streamhps_http_connections {httpd.open_connections()}")
    family(
        "streamhps_http_connections_refused_total", "counter",
        "Connections answered 503 because --max-connections were open.",
    )  # fmt: skip
    lines.append(f"streamhps_http_connections_refused_total {httpd.refused}")
    family(
        "streamhps_http_requests_cut_off_total", "counter",
        "Connections closed because a request was not sent within --request-timeout.",
    )  # fmt: skip
    lines.append(f"streamhps_http_requests_cut_off_total {httpd.cut_off}")
    counters = server.counters_snapshot()
    family("streamhps_requests_total", "counter", "Requests served, by kind.")
    for k in ("lookups", "predicts", "errors"):
        lines.append(f'streamhps_requests_total{{kind="{k}"}} {counters[k]}')
    return "\n".join(lines) + "\n"
