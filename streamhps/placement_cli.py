"""``streamhps plan``: write a placement file (which sparse shard serves which partitions)."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser(
        "plan",
        help="place table partitions on N sparse shards (table-, row-wise or load-balanced)",
        description="Write a placement file: which partitions of which table each sparse shard "
        "serves, each shard's cache memory and share of lookups. Refuses a plan that does not "
        "fit --capacity-gb per shard, saying by how much. Format: schemas/PLACEMENT.md.",
    )
    p.add_argument("--config", default=None, help="config TOML (default $STREAMHPS_CONFIG)")
    p.add_argument("--shards", type=int, required=True, help="number of sparse shards")
    p.add_argument(
        "--capacity-gb",
        type=float,
        default=None,
        help="cache memory per shard in GiB (default: unlimited)",
    )
    p.add_argument(
        "--strategy",
        choices=("table", "row", "load"),
        default=None,
        help="table: whole tables; row: partition p on shard p %% N; load: pack partitions by "
        "access frequency (needs --trace). Default: load with --trace, else row",
    )
    p.add_argument(
        "--trace",
        default=None,
        help="key trace .npz: one int64 array of looked-up keys per table name",
    )
    p.add_argument(
        "--rows",
        action="append",
        default=[],
        metavar="TABLE=N",
        help="rows of a table (repeatable); default: the trace's distinct keys, else "
        "serving.cache_capacity",
    )
    p.add_argument("--backend", choices=("cuda", "numpy"), default="cuda", help="cache backend")
    p.add_argument(
        "--headroom",
        type=float,
        default=1.25,
        help="cache rows per stored row (room in the 32-slot buckets; default 1.25)",
    )
    p.add_argument("--out", required=True, help="placement file to write (JSON)")
    p.set_defaults(func=_cmd_plan)


def _parse_rows(items: list[str]) -> dict[str, int]:
    from streamhps.errors import ConfigError

    out = {}
    for it in items:
        name, sep, n = it.partition("=")
        try:
            if not sep:
                raise ValueError
            out[name] = int(n.replace("_", ""))
        except ValueError:
            raise ConfigError(f"--rows must look like TABLE=N, got {it!r}") from None
    return out


def _cmd_plan(args: argparse.Namespace) -> int:
    from rich.table import Table

    from streamhps.cli import console
    from streamhps.config import Config
    from streamhps.placement import GIB, load_trace, plan

    cfg = Config.load(args.config)
    trace = load_trace(args.trace) if args.trace else None
    strategy = args.strategy or ("load" if trace is not None else "row")
    cap = None if args.capacity_gb is None else int(args.capacity_gb * GIB)
    placement = plan(
        cfg, args.shards, strategy=strategy, capacity_bytes=cap, trace=trace,
        rows=_parse_rows(args.rows), backend=args.backend, headroom=args.headroom,
    )  # fmt: skip
    out = placement.save(args.out)
    t = Table("shard", "partitions", "cache rows", "memory GiB", "lookup share")
    for s in placement.shards:
        parts = "; ".join(f"{n}: {_ranges(ps)}" for n, ps in s.partitions.items()) or "-"
        t.add_row(
            str(s.shard), parts, f"{sum(s.cache_rows.values()):,}",
            f"{s.memory_bytes / GIB:.3f}", f"{s.lookup_share:.1%}",
        )  # fmt: skip
    console.print(t)
    cap_s = "unlimited" if cap is None else f"{cap / GIB:.3f} GiB per shard"
    console.print(
        f"{strategy}-wise over {placement.n_shards} shards ({cap_s}; lookups from "
        f"{placement.lookup_source}): imbalance max/mean lookups [bold]{placement.imbalance:.3f}[/], "
        f"memory {placement.memory_imbalance:.3f} -> {out}",
        soft_wrap=True,
    )
    empty = [s.shard for s in placement.shards if not s.partitions]
    if empty:
        console.print(f"[yellow]note:[/] shard(s) {empty} serve nothing with this strategy")
    return 0


def _ranges(ps: tuple[int, ...]) -> str:
    """0,1,2,5 -> '0-2,5'."""
    out: list[str] = []
    start = prev = None
    for p in ps:
        if prev is not None and p == prev + 1:
            prev = p
            continue
        if start is not None:
            out.append(f"{start}-{prev}" if prev != start else str(start))
        start = prev = p
    if start is not None:
        out.append(f"{start}-{prev}" if prev != start else str(start))
    return ",".join(out)
