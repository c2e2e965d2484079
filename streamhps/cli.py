"""The ``streamhps`` command line. The CLI owns output and exit codes; library code only logs.

Each subcommand is a ``_cmd_<name>(args) -> int`` function registered in :func:`build_parser`.
The library's own commands are registered there; the applications' (``serve``, ``train``,
``demo``) plug in through the ``streamhps.commands`` entry-point group
(:func:`register_application_commands`), so the library never imports them.
Exit codes: 0 ok, 1 runtime failure, 2 bad usage or config.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from importlib.metadata import entry_points
from typing import Any

from rich.console import Console

from streamhps.errors import ConfigError, StreamHPSError

console = Console(stderr=False)
err_console = Console(stderr=True)


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(
        level=max(level, logging.DEBUG),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _wait_for_signal() -> int:
    """Block until SIGINT/SIGTERM; return the signal number."""
    got: dict[str, int] = {}
    done = threading.Event()

    def handler(signum: int, _frame: Any) -> None:
        got["sig"] = signum
        done.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    while not done.wait(0.5):
        pass
    return got["sig"]


# ---------------------------------------------------------------- broker


def _cmd_broker(args: argparse.Namespace) -> int:
    from streamhps.broker import EmbeddedBroker

    broker = EmbeddedBroker(port=args.port, host=args.host, log_path=args.log)
    broker.start()
    console.print(
        f"[green]embedded broker[/] (Tansu, pid {broker.pid}) listening on "
        f"[bold]{broker.bootstrap_servers}[/]; topics live in memory only. Ctrl-C to stop."
    )
    try:
        sig = _wait_for_signal()
        console.print(f"received {signal.Signals(sig).name}, stopping the broker")
    finally:
        broker.stop()
    return 0


# ---------------------------------------------------------------- topics


def _cmd_topics_create(args: argparse.Namespace) -> int:
    from streamhps.config import Config
    from streamhps.topics import ensure_topics, planned_topics

    cfg = Config.load(args.config)
    plan = planned_topics(cfg.topic_prefix, cfg.tables)
    created = ensure_topics(cfg.kafka, plan)
    for name, n in plan.items():
        state = "created" if name in created else "exists"
        console.print(f"{state:8} {name} ({n} partition{'s' if n != 1 else ''})")
    return 0


# ---------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="streamhps", description=__doc__.splitlines()[0] if __doc__ else None
    )
    p.add_argument(
        "-v", "--verbose", action="count", default=1, help="more logging (-vv for debug)"
    )
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("broker", help="run the embedded Kafka-compatible broker (Tansu)")
    b.add_argument("--port", type=int, default=9092)
    b.add_argument("--host", default="127.0.0.1")
    b.add_argument("--log", default=None, help="file for the broker's own log output")
    b.set_defaults(func=_cmd_broker)

    t = sub.add_parser("topics", help="manage the deployment's topics")
    tsub = t.add_subparsers(dest="topics_command", required=True)
    tc = tsub.add_parser("create", help="create the table, .dlq and .dense topics (idempotent)")
    tc.add_argument("--config", default=None, help="config TOML (default $STREAMHPS_CONFIG)")
    tc.set_defaults(func=_cmd_topics_create)

    from streamhps.placement_cli import register as register_plan
    from streamhps.processor.cli import register as register_processor

    register_processor(sub)  # processor, inspect, snapshot
    register_plan(sub)  # plan
    register_application_commands(sub)  # serve, train, demo: the applications' entry points
    return p


COMMANDS_GROUP = "streamhps.commands"
"""Entry-point group through which applications add subcommands to ``streamhps``.

Each entry point names a ``register(subparsers)`` function, e.g. in an application's
``pyproject.toml``::

    [project.entry-points."streamhps.commands"]
    serve = "servers.cli:register"

The library never imports its applications; they plug in here (installed metadata).
"""


def register_application_commands(sub: Any) -> None:
    """Call every ``streamhps.commands`` entry point's ``register(sub)``.

    An application that is declared but cannot be imported (a partial install) loses its
    command, with a warning naming it, rather than taking the whole command line down.
    """
    seen: set[str] = set()
    for ep in sorted(entry_points(group=COMMANDS_GROUP), key=lambda e: e.name):
        if ep.name in seen:  # the same distribution found twice on sys.path
            continue
        seen.add(ep.name)
        try:
            register = ep.load()
        except ImportError as e:
            err_console.print(
                f"[yellow]warning:[/] command {ep.name!r} ({ep.value}) is not available: {e}"
            )
            continue
        register(sub)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        err_console.print(f"[red]config error:[/] {e}")
        return 2
    except StreamHPSError as e:
        err_console.print(f"[red]error:[/] {e}")
        return 1
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
