"""``streamhps serve``: the inference server over one worker (or, as a main shard, over sparse shards).

Roles:

* ``single`` (default): one worker holding every table; lookups and predicts.
* ``sparse``: a sharded worker (``--placement P --shard I``) answering lookups of its partitions
  only; rows from every ``--store`` given (one per processor shard, or a directory of them).
* ``main``: no worker; holds the dense model (follows the dense topic itself) and fans each
  request's lookups out to the sparse shards (``--placement P --shards URL,URL,...``, in shard
  order), then predicts.
"""

from __future__ import annotations

import argparse
import logging
import signal
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def register(sub: Any) -> None:
    s = sub.add_parser(
        "serve",
        help="run the HTTP inference server (one worker; or a sparse shard, or the main shard)",
    )
    s.add_argument("--config", default=None, help="config TOML (default $STREAMHPS_CONFIG)")
    s.add_argument(
        "--role",
        choices=("single", "sparse", "main"),
        default="single",
        help="single: one worker, every table (default); sparse: the lookups of one shard of a "
        "placement; main: the dense model, lookups fanned out to the sparse shards",
    )
    s.add_argument(
        "--store",
        action="append",
        default=[],
        help="LMDB store written by a processor; repeat it for several processor shards, or give "
        "a directory whose sub-directories are their stores (single and sparse roles)",
    )
    s.add_argument(
        "--store-wait",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="wait this long for the processor to create a store that does not exist yet, "
        "logging progress (default 60; 0: fail at once)",
    )
    s.add_argument(
        "--placement", default=None, help="placement file from `streamhps plan` (sparse, main)"
    )
    s.add_argument("--shard", type=int, default=None, help="this sparse shard's number (sparse)")
    s.add_argument(
        "--shards",
        default=None,
        help="URL,URL,...: the sparse shards in shard order (main)",
    )
    s.add_argument(
        "--device",
        default="cpu",
        help="cache backend: cpu, cuda or cuda:N (GPU N; one worker process per GPU)",
    )
    s.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (0.0.0.0 in containers)"
    )
    s.add_argument("--port", type=int, default=8000)
    s.add_argument(
        "--max-batch-rows",
        type=int,
        default=8192,
        help="dynamic batching: merge concurrent predicts into device batches of up to this many "
        "rows (0: off, every predict runs alone)",
    )
    s.add_argument(
        "--max-queue-delay-ms",
        type=float,
        default=1.0,
        help="dynamic batching: the longest a predict waits for others to join its batch (only "
        "while more are arriving)",
    )
    s.add_argument(
        "--batch-workers", type=int, default=1, help="dynamic batching: batches run at once"
    )
    s.add_argument(
        "--auth-token-file",
        default=None,
        metavar="PATH",
        help="require 'Authorization: Bearer <token>' on every route but /healthz; the token is "
        "this file's content (keep it 0600). A main shard sends it to its sparse shards too",
    )
    s.add_argument(
        "--max-body-bytes",
        type=int,
        default=64 << 20,
        help="larger request bodies are refused with 413 before they are read (default 64 MiB)",
    )
    s.add_argument(
        "--request-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="a client has this long to send a whole request (and an idle keep-alive connection "
        "to start its next one) before its connection is closed (default 30)",
    )
    s.add_argument(
        "--max-connections",
        type=int,
        default=256,
        help="connections served at once (one thread each); more are answered 503 at once",
    )
    s.add_argument(
        "--ready-timeout",
        type=float,
        default=0.0,
        help="seconds to wait for readiness before serving (0: serve at once; /readyz tells)",
    )
    s.set_defaults(func=_cmd_serve)


def read_token(path: str) -> str:
    """The bearer token in ``path`` (surrounding whitespace dropped); ConfigError if unusable."""
    import stat

    from streamhps.errors import ConfigError

    try:
        text = Path(path).read_text()
        mode = stat.S_IMODE(Path(path).stat().st_mode)
    except OSError as e:
        raise ConfigError(f"cannot read --auth-token-file {path}: {e.strerror}") from e
    token = text.strip()
    if not token:
        raise ConfigError(f"--auth-token-file {path} is empty: put the token in it")
    if any(c.isspace() for c in token):
        raise ConfigError(f"--auth-token-file {path} holds more than one word: one token only")
    if mode & 0o077:
        log.warning("%s is readable by other users (mode %o): chmod 600 it", path, mode)
    return token


def _check_args(args: argparse.Namespace) -> None:
    from streamhps.errors import ConfigError

    if args.role in ("single", "sparse") and not args.store:
        raise ConfigError(f"serve --role {args.role} needs --store (repeatable)")
    if args.role == "sparse" and (args.placement is None or args.shard is None):
        raise ConfigError("serve --role sparse needs --placement P and --shard I")
    if args.role == "main" and (args.placement is None or not args.shards):
        raise ConfigError("serve --role main needs --placement P and --shards URL,URL,...")
    if args.role == "single" and (args.placement or args.shard is not None or args.shards):
        raise ConfigError(
            "--placement/--shard/--shards need --role sparse (one shard) or --role main"
        )


def _cmd_serve(args: argparse.Namespace) -> int:
    from servers.app import InferenceServer
    from streamhps.cli import _wait_for_signal, console
    from streamhps.config import Config

    _check_args(args)
    token = read_token(args.auth_token_file) if args.auth_token_file else None
    cfg = Config.load(args.config)
    worker: Any
    if args.role == "main":
        from streamhps.routing import ShardRouter

        urls = [u.strip() for u in args.shards.split(",") if u.strip()]
        worker = ShardRouter(cfg, args.placement, urls, token=token)
        what = f"main over {len(urls)} sparse shards ({', '.join(urls)})"
    else:
        from streamhps.worker import InferenceWorker

        sparse = args.role == "sparse"
        worker = InferenceWorker.from_config(
            cfg,
            store=args.store,
            device=args.device,
            placement=args.placement if sparse else None,
            shard=args.shard if sparse else None,
            follow_dense=not sparse,
            store_wait_s=args.store_wait,
        )
        owned = "; ".join(f"{t} {ps}" for t, ps in worker.owned.items() if ps)
        what = f"sparse shard {args.shard} (partitions {owned})" if sparse else "single worker"
        what += f"; device {args.device}"
    worker.start()
    try:
        if args.ready_timeout:
            worker.wait_ready(args.ready_timeout)
        server = InferenceServer(
            worker, cfg, host=args.host, port=args.port, role=args.role,
            max_batch_rows=args.max_batch_rows, max_queue_delay_ms=args.max_queue_delay_ms,
            batch_workers=args.batch_workers,
            # the main shard's model on --device; a worker's where its rows are
            model_device=args.device if args.role == "main" else None,
            max_body_bytes=args.max_body_bytes, request_timeout_s=args.request_timeout,
            max_connections=args.max_connections, auth_token=token,
        )  # fmt: skip
        server.start()
        try:
            console.print(
                f"[green]inference server[/] on [bold]{server.url}[/]: {what} (tables "
                f"{', '.join(t.name for t in cfg.tables)}; staleness bound "
                f"{cfg.serving.max_staleness_s}s). Status page: {server.url}/ . Ctrl-C to stop.",
                soft_wrap=True,
            )
            sig = _wait_for_signal()
            console.print(f"received {signal.Signals(sig).name}, stopping")
        finally:
            server.stop()
    finally:
        worker.stop()
    return 0
