"""CLI subcommands of the processor area: ``processor``, ``inspect``, ``snapshot``."""

from __future__ import annotations

import argparse
import json
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser(
        "processor", help="consume the table topics into the LMDB store (a faust worker)"
    )
    p.add_argument("--config", default=None, help="config TOML (default $STREAMHPS_CONFIG)")
    p.add_argument("--store", required=True, help="LMDB store directory of this shard")
    p.add_argument(
        "--shard",
        default="0/1",
        help="I/N: own partitions p %% N == I of every table (default 0/1)",
    )
    p.add_argument(
        "--web-host",
        default="127.0.0.1",
        help="address of the faust web server (/metrics, /healthz); default loopback only",
    )
    p.add_argument(
        "--web-port",
        type=int,
        default=0,
        help="port of the faust web server; 0 (default): a free port, printed at start",
    )
    p.set_defaults(func=_cmd_processor)

    i = sub.add_parser(
        "inspect", help="show an LMDB store: tables, rows, applied versions, offsets, size"
    )
    i.add_argument("--store", required=True)
    i.add_argument("--json", action="store_true", help="print JSON instead of tables")
    i.set_defaults(func=_cmd_inspect)

    s = sub.add_parser("snapshot", help="consistent compacted copy of a store (offsets included)")
    s.add_argument("--store", required=True)
    s.add_argument("--out", required=True, help="empty (or new) directory for the copy")
    s.set_defaults(func=_cmd_snapshot)


def _parse_shard(text: str) -> tuple[int, int]:
    from streamhps.errors import ConfigError

    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard must look like I/N (e.g. 0/2), got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise ConfigError(f"--shard {text}: need 0 <= I < N")
    return i, n


def _cmd_processor(args: argparse.Namespace) -> int:
    from streamhps.cli import console
    from streamhps.config import Config
    from streamhps.processor.service import ProcessorApp, run_worker

    cfg = Config.load(args.config)
    if not 0 <= args.web_port <= 65535:
        from streamhps.errors import ConfigError

        raise ConfigError(f"--web-port must be 0..65535 (0: any free port), got {args.web_port}")
    papp = ProcessorApp(
        cfg, args.store, shard=_parse_shard(args.shard), web_host=args.web_host,
        web_port=args.web_port,
    )  # fmt: skip

    def ready(p: ProcessorApp) -> None:
        addr = p.web_address
        web = f"http://{addr[0]}:{addr[1]}" if addr else "(web server address unknown)"
        console.print(
            f"[green]processor[/] shard {args.shard} of [bold]{cfg.topic_prefix}[/] "
            f"({', '.join(t.name for t in cfg.tables)}) -> {args.store}; "
            f"metrics at {web}/metrics; SIGTERM/Ctrl-C to stop",
            soft_wrap=True,
        )

    run_worker(papp, on_ready=ready)  # the faust worker: returns after SIGTERM/SIGINT
    console.print("processor stopped cleanly")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from rich.table import Table

    from streamhps.cli import console
    from streamhps.store import LmdbStore

    with LmdbStore.open(args.store, readonly=True) as st:
        info = st.stats()
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    console.print(
        f"[bold]{info['path']}[/]: {info['disk_bytes'] / 2**20:.1f} MiB on disk, "
        f"{info['used_bytes'] / 2**20:.1f} MiB used of a {info['map_size'] / 2**20:.0f} MiB map, "
        f"{info['batches']} batches committed"
    )
    t = Table("table", "dim", "dtype", "partitions (held)", "rows", "applied", "rows in", "written",
              "duplicate", "stale", "compaction", "messages", "dlq")  # fmt: skip
    for name, d in info["tables"].items():
        c = d["compaction"]
        ratio = c["compaction_ratio"]
        t.add_row(
            name, str(d["dim"]), d["dtype"], f"{d['partitions']} ({len(d['held_partitions'])})", str(d["rows"]),
            str(d["applied_version"]), str(c["rows_in"]), str(c["rows_written"]), str(c["rows_duplicate"]),
            str(c["rows_stale"]), "-" if ratio is None else f"{ratio:.2f}x", str(c["messages"]), str(c["dlq"]),
        )  # fmt: skip
    console.print(t)
    o = Table("topic[partition]", "next offset")
    for k, v in info["offsets"].items():
        o.add_row(k, str(v))
    console.print(o)
    return 0


def _cmd_snapshot(args: argparse.Namespace) -> int:
    from streamhps.cli import console
    from streamhps.store import LmdbStore

    with LmdbStore.open(args.store, readonly=True) as st:
        out = st.snapshot(args.out)
    with LmdbStore.open(out, readonly=True) as snap:
        info = snap.stats()
    rows = sum(d["rows"] for d in info["tables"].values())
    console.print(
        f"snapshot of {args.store} -> [bold]{out}[/]: {rows} rows, {len(info['offsets'])} offsets, "
        f"{info['disk_bytes'] / 2**20:.1f} MiB. Start a processor or worker with --store {out}."
    )
    return 0
