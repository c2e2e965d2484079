"""Arguments of ``streamhps train`` (kept free of torch so the CLI starts fast)."""

from __future__ import annotations

import argparse

from trainers.synthetic import StreamSpec


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="config TOML (default $STREAMHPS_CONFIG)")
    p.add_argument("--steps", type=int, default=None, help="steps to train (default: until Ctrl-C)")
    p.add_argument("--duration", type=float, default=None, help="seconds to train")
    p.add_argument("--publish-every", type=int, default=20, help="steps between publishes")
    p.add_argument("--dense-every", type=int, default=1, help="commits between dense publishes")
    p.add_argument(
        "--steps-per-second", type=float, default=None, help="throttle (default: flat out)"
    )
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--drift-period", type=float, default=12000.0, help="steps per turn of the hidden truth"
    )


def stream_spec_from_args(args: argparse.Namespace) -> StreamSpec:
    return StreamSpec(seed=args.seed, drift_period_steps=args.drift_period)
