"""What the demo shows: the live view while it runs and the summary table at the end."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from demo.app import DemoOptions


def quantile(xs: list[float], q: float) -> float | None:
    return float(np.quantile(np.asarray(xs), q)) if xs else None


def to_ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000, 2)


def _fmt(x: Any, spec: str = ".3f") -> str:
    if x is None or (isinstance(x, float) and x != x):
        return "-"
    return format(x, spec)


def _spark(vals: list[float]) -> str:
    bars = "▁▂▃▄▅▆▇█"
    vs = [v for v in vals if v == v]
    if not vs:
        return ""
    lo, hi = 0.5, max(1.0, max(vs))
    return "".join(
        bars[min(7, max(0, int((v - lo) / (hi - lo) * 7.999)))] if v == v else " " for v in vals
    )


def live_view(
    opts: DemoOptions, elapsed: float, trainer: Any, state: dict[str, Any], results: list[dict[str, Any]],
    staleness: list[float], hit: list[float], ingest: list[float], latencies: list[float], errors: dict[str, int],
) -> Any:  # fmt: skip
    from rich.table import Table

    s = trainer.stats
    t = Table(
        title=f"streamhps demo  {elapsed:5.0f}s / {opts.duration:.0f}s",
        show_header=False,
        min_width=72,
    )
    t.add_column(style="bold cyan", no_wrap=True)
    t.add_column(no_wrap=True)
    t.add_row(
        "trainer",
        f"step {s.step}  committed v{s.last_version}  rows published {s.rows_published}  loss {_fmt(s.loss_ewma)}",
    )
    applied = state.get("applied") or {}
    t.add_row(
        "served",
        f"applied version {min(applied.values()) if applied else '-'}  ready {state.get('ready')}  predictions {state['served']}",
    )
    vis = state.get("visible_ms") or {}
    t.add_row(
        "rows visible",
        f"publish -> lookup p50 {_fmt(vis.get('p50'), '.1f')} ms  p99 {_fmt(vis.get('p99'), '.1f')} ms  (recent rows; a commit every {opts.publish_every / opts.steps_per_second:.2f} s)",
    )
    t.add_row(
        "behind head",
        f"now {_fmt(staleness[-1] if staleness else None, '.3f')} s   p50 {_fmt(quantile(staleness, 0.5))}  p99 {_fmt(quantile(staleness, 0.99))}  bound {opts.max_staleness_s} s",
    )
    t.add_row(
        "cache",
        f"hit ratio {_fmt(hit[-1] if hit else None)}   ingest {_fmt(ingest[-1] if ingest else None, '.0f')} rows/s",
    )
    t.add_row("status page", f"{state.get('url', '-')}/  (live charts)")
    t.add_row(
        "predict",
        f"p50 {_fmt(to_ms(quantile(latencies, 0.5)), '.1f')} ms  p99 {_fmt(to_ms(quantile(latencies, 0.99)), '.1f')} ms  errors {sum(errors.values())}",
    )
    if results:
        last = results[-1]
        t.add_row(
            "AUC online",
            f"{_fmt(last['auc_online'])}  {_spark([r['auc_online'] for r in results])}",
        )
        t.add_row(
            "AUC frozen",
            f"{_fmt(last['auc_frozen'])}  {_spark([r['auc_frozen'] for r in results])}",
        )
        t.add_row("AUC oracle", f"{_fmt(last['auc_oracle'])}  (the hidden truth: the ceiling)")
    else:
        t.add_row("AUC", "first window in progress")
    return t


def print_summary(summary: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    t = Table(title="streamhps demo summary", show_header=False)
    t.add_column(style="bold")
    t.add_column()
    t.add_row(
        "rows published",
        f"{summary['rows_published']} in {summary['commits']} commits (trainer steps {summary['trainer_steps']})",
    )
    t.add_row(
        "versions applied",
        f"{summary['versions_applied']} of {summary['commits']}; applied version {summary['applied_version']} / committed {summary['last_committed_version']}",
    )
    t.add_row(
        "dense model",
        f"{summary['dense_updates_published']} updates published; serving v{summary['dense_version_served']}",
    )
    t.add_row(
        "rows visible",
        f"publish -> lookup p50 {_fmt(summary['rows_visible_ms_p50'], '.1f')} ms   p99 {_fmt(summary['rows_visible_ms_p99'], '.1f')} ms   max {_fmt(summary['rows_visible_ms_max'], '.1f')} ms   ({summary['rows_visible_counted']} rows)",
    )
    t.add_row(
        "behind head",
        f"p50 {_fmt(summary['staleness_s_p50'])} s   p99 {_fmt(summary['staleness_s_p99'])} s   max {_fmt(summary['staleness_s_max'])} s   (readiness; bound {summary['max_staleness_s']} s)",
    )
    t.add_row("cache hit ratio", _fmt(summary["cache_hit_ratio"]))
    t.add_row(
        "predictions",
        f"{summary['predictions_served']} served; p50 {_fmt(summary['predict_latency_ms_p50'], '.1f')} ms, p99 {_fmt(summary['predict_latency_ms_p99'], '.1f')} ms; errors {summary['predict_errors'] or 0}",
    )
    t.add_row(
        "AUC online (served)",
        f"mean {_fmt(summary['auc_online_mean'])}   second half {_fmt(summary['auc_online_late'])}",
    )
    t.add_row(
        "AUC frozen (no updates)",
        f"mean {_fmt(summary['auc_frozen_mean'])}   second half {_fmt(summary['auc_frozen_late'])}   (copy of v{summary['frozen_version']})",
    )
    t.add_row("AUC oracle (hidden truth)", f"mean {_fmt(summary['auc_oracle_mean'])}")
    console.print(t)
    w = Table(title="AUC over time (per window)")
    for col in ("t (s)", "examples", "online", "frozen", "oracle"):
        w.add_column(col, justify="right")
    for r in summary["auc_windows"]:
        w.add_row(
            f"{r['t_s']:.0f}",
            str(r["examples"]),
            _fmt(r["auc_online"]),
            _fmt(r["auc_frozen"]),
            _fmt(r["auc_oracle"]),
        )
    console.print(w)
