"""``streamhps serve``: the inference server over one worker."""

from __future__ import annotations

import argparse
import signal
from typing import Any


def register(sub: Any) -> None:
    s = sub.add_parser("serve", help="run the HTTP inference server over one inference worker")
    s.add_argument("--config", default=None, help="config TOML (default $STREAMHPS_CONFIG)")
    s.add_argument("--store", required=True, help="LMDB store directory written by the processor")
    s.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="cache backend")
    s.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (0.0.0.0 in containers)"
    )
    s.add_argument("--port", type=int, default=8000)
    s.add_argument(
        "--ready-timeout",
        type=float,
        default=0.0,
        help="seconds to wait for readiness before serving (0: serve at once; /readyz tells)",
    )
    s.set_defaults(func=_cmd_serve)


def _cmd_serve(args: argparse.Namespace) -> int:
    from servers.app import InferenceServer
    from streamhps.cli import _wait_for_signal, console
    from streamhps.config import Config
    from streamhps.worker import InferenceWorker

    cfg = Config.load(args.config)
    worker = InferenceWorker.from_config(cfg, store=args.store, device=args.device)
    worker.start()
    try:
        if args.ready_timeout:
            worker.wait_ready(args.ready_timeout)
        server = InferenceServer(worker, cfg, host=args.host, port=args.port).start()
        try:
            console.print(
                f"[green]inference server[/] on [bold]{server.url}[/] "
                f"(tables {', '.join(t.name for t in cfg.tables)}; device {args.device}; "
                f"staleness bound {cfg.serving.max_staleness_s}s). Status page: {server.url}/ . Ctrl-C to stop.",
                soft_wrap=True,
            )
            sig = _wait_for_signal()
            console.print(f"received {signal.Signals(sig).name}, stopping")
        finally:
            server.stop()
    finally:
        worker.stop()
    return 0
