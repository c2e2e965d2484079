"""Fixtures for processor tests: a config file and a processor subprocess started with the CLI."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from streamhps.testing import start_processor, stop_processor


def processor_config(
    path: Path, bootstrap: str, prefix: str, *, dim: int = 16, partitions: int = 2
) -> Path:
    path.write_text(
        f"""topic_prefix = "{prefix}"
[kafka]
"bootstrap.servers" = "{bootstrap}"
[[tables]]
name = "user"
dim = {dim}
partitions = {partitions}
[processor]
batch_max_messages = 64
batch_max_seconds = 0.02
progress_interval_s = 1.0
history_check_s = 0.3
"""
    )
    return path


@pytest.fixture
def make_config() -> Callable[..., Path]:
    """``make_config(path, bootstrap, prefix, dim=16, partitions=2)`` writes a processor config."""
    return processor_config


@pytest.fixture
def run_processor(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start ``streamhps processor`` subprocesses (``start_processor``'s keywords); every one still running is stopped at the end."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(config: Path, store: Path, **kwargs: Any) -> subprocess.Popen[bytes]:
        p = start_processor(config, store, log_path=tmp_path / "processor.log", **kwargs)
        procs.append(p)
        return p

    yield start
    for p in procs:
        stop_processor(p, timeout=10)
