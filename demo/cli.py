"""``streamhps demo``: the command that runs :func:`demo.app.run_demo` and prints its summary.

Registered with the ``streamhps`` command line through the ``streamhps.commands`` entry point.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
from pathlib import Path
from typing import Any

import numpy as np


def register(sub: Any) -> None:
    d = sub.add_parser(
        "demo", help="run broker, processor, server and trainer; show fresh vs frozen AUC"
    )
    d.add_argument(
        "--duration",
        type=float,
        default=180.0,
        help="seconds of online training and traffic (default 180)",
    )
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    d.add_argument(
        "--port", type=int, default=0, help="inference server port (default: a free one)"
    )
    d.add_argument(
        "--warmup-steps", type=int, default=1500, help="training steps before the first commit"
    )
    d.add_argument(
        "--steps-per-second", type=float, default=100.0, help="trainer speed after warm-up"
    )
    d.add_argument("--summary-json", default=None, help="write the summary here as JSON")
    d.add_argument(
        "--workdir",
        default=None,
        help="keep config, logs and LMDB here (default: a temp dir, removed)",
    )
    d.add_argument("--no-live", action="store_true", help="no live view (logs and CI)")
    d.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from demo.app import DemoOptions, run_demo
    from demo.view import print_summary
    from streamhps.cli import console

    opts = DemoOptions(
        duration=args.duration, seed=args.seed, device=args.device, port=args.port,
        warmup_steps=args.warmup_steps, steps_per_second=args.steps_per_second,
        summary_json=args.summary_json, workdir=args.workdir, live=not args.no_live,
    )  # fmt: skip

    def on_term(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    if args.verbose <= 1:  # per-commit INFO lines would scroll the live view away
        logging.getLogger().setLevel(logging.WARNING)
    summary = run_demo(opts, console)
    console.print()
    print_summary(summary, console)
    if opts.summary_json:
        Path(opts.summary_json).write_text(json.dumps(summary, indent=2, default=_json_default))
        console.print(f"summary written to {opts.summary_json}")
    return 0


def _json_default(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")
