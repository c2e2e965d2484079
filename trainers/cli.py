"""``streamhps train``: the online DLRM trainer (torch imported only when it runs)."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from typing import Any


def register(sub: Any) -> None:
    from trainers.dlrm_args import add_arguments

    t = sub.add_parser(
        "train", help="train a small DLRM online on a synthetic click stream and publish it"
    )
    add_arguments(t)
    t.set_defaults(func=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from streamhps.cli import console
    from streamhps.config import Config
    from trainers.dlrm import OnlineTrainer
    from trainers.dlrm_args import stream_spec_from_args

    cfg = Config.load(args.config)
    if args.verbose <= 1:  # the progress bar says what the per-commit INFO lines would
        logging.getLogger().setLevel(logging.WARNING)
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    trainer = OnlineTrainer(
        cfg, stream=stream_spec_from_args(args), batch_size=args.batch_size,
        publish_every=args.publish_every, dense_every=args.dense_every,
    )  # fmt: skip
    total = args.steps
    columns = [
        TextColumn("[bold]train[/]"), BarColumn(), TextColumn("step {task.completed:.0f}"),
        TextColumn("loss {task.fields[loss]:.3f}  auc {task.fields[auc]:.3f}  v{task.fields[version]}  rows {task.fields[rows]}"),
        TimeElapsedColumn(),
    ]  # fmt: skip
    with trainer, Progress(*columns, console=console, transient=False) as progress:
        first = trainer.stats.step  # above 0 when resuming after an earlier run's commits
        if first:
            progress.console.print(f"resuming after version {first}, committed by an earlier run")
        task = progress.add_task(
            "train", total=total, loss=float("nan"), auc=float("nan"), version=0, rows=0
        )

        def update(tr: OnlineTrainer) -> None:
            s = tr.stats
            progress.update(
                task,
                completed=s.step - first,
                loss=s.loss_ewma,
                auc=s.auc_ewma,
                version=s.last_version,
                rows=s.rows_published,
            )

        trainer.run(
            steps=args.steps, duration=args.duration, steps_per_second=args.steps_per_second,
            stop=stop, on_publish=update,
        )  # fmt: skip
        update(trainer)
    s = trainer.stats
    console.print(
        f"trained {s.step} steps ({s.samples} examples); published {s.rows_published} rows in "
        f"{s.commits} commits, last version {s.last_version}; {s.dense_published} dense updates"
    )
    return 0
