"""Stopping a child process: SIGTERM, a bounded wait, then SIGKILL. The one way it is done.

Used for the embedded broker, the processor a test or bench starts, the demo's children and the
benchmarks' servers. ``group=True`` signals the child's whole process group (a child started
with ``start_new_session=True`` and whatever it started in turn).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
from typing import Any

log = logging.getLogger(__name__)


def stop_process(
    proc: subprocess.Popen[Any],
    timeout: float = 15.0,
    *,
    group: bool = False,
    name: str | None = None,
) -> int:
    """SIGTERM ``proc`` (a graceful stop), wait up to ``timeout`` seconds, then SIGKILL it and
    wait; return its exit code. A stopped (SIGSTOP) child is continued first, so it can act on
    the SIGTERM. Already exited: just its exit code."""
    if proc.poll() is None:
        _signal(proc, signal.SIGCONT, group)
        _signal(proc, signal.SIGTERM, group)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning(
                "%s (pid %d) ignored SIGTERM for %.0fs; killing it",
                name or "child",
                proc.pid,
                timeout,
            )
            _signal(proc, signal.SIGKILL, group)
            proc.wait()
    return int(proc.returncode)


def _signal(proc: subprocess.Popen[Any], sig: signal.Signals, group: bool) -> None:
    with contextlib.suppress(ProcessLookupError):  # it exited meanwhile
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
