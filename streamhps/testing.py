"""Helpers for tests and demos: run the processor as a real subprocess and wait on its store.

::

    proc = start_processor(config_path, store_dir, log_path=tmp / "proc.log")
    wait_for_applied_version(store_dir, "user", 7, timeout=30)
    stop_processor(proc)                       # SIGTERM, then wait (kill -9 after a grace period)

The processor is started with the CLI (``python -m streamhps processor ...``) as a normal
child process, so a test may SIGSTOP/SIGCONT/SIGKILL it like any deployment would.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from streamhps.errors import StoreError, StreamHPSError
from streamhps.processes import stop_process


def start_processor(
    config_path: str | os.PathLike[str],
    store_dir: str | os.PathLike[str],
    *,
    shard: str = "0/1",
    log_path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    extra_args: Sequence[str] = (),
    wait_ready: float = 30.0,
) -> subprocess.Popen[bytes]:
    """Start ``streamhps processor`` and wait (up to ``wait_ready`` s) until its store exists.

    Output goes to ``log_path`` (appended) or is discarded. ``env`` is added to os.environ.
    """
    cmd = [sys.executable, "-m", "streamhps", "-v", "processor", "--config", str(config_path),
           "--store", str(store_dir), "--shard", shard, *extra_args]  # fmt: skip
    out: IO[bytes] | int = subprocess.DEVNULL
    if log_path is not None:
        out = open(log_path, "ab")  # noqa: SIM115 - the child holds it; closed below
    try:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
    finally:
        if not isinstance(out, int):
            out.close()
    if wait_ready:
        deadline = time.monotonic() + wait_ready
        while not _has_tables(store_dir):
            if proc.poll() is not None:
                raise StreamHPSError(
                    f"processor exited with code {proc.returncode} before its store was ready; see {log_path}"
                )
            if time.monotonic() > deadline:
                raise StreamHPSError(
                    f"processor store {store_dir} not ready after {wait_ready}s; see {log_path}"
                )
            time.sleep(0.05)
    return proc


def stop_processor(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> int:
    """SIGTERM (graceful) and wait; SIGKILL if it has not exited after ``timeout``. Returns the
    exit code (:func:`streamhps.processes.stop_process`)."""
    return stop_process(proc, timeout, name="processor")


def kill_processor(proc: subprocess.Popen[bytes]) -> None:
    """kill -9, as a crash would."""
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def _has_tables(store_dir: str | os.PathLike[str]) -> bool:
    from streamhps.store import LmdbStore

    if not (Path(store_dir) / "data.mdb").exists():
        return False
    try:
        with LmdbStore.open(store_dir, readonly=True) as st:
            return bool(st.tables())
    except StoreError:
        return False


def _wait(what: str, cond: Any, timeout: float, proc: subprocess.Popen[bytes] | None) -> None:
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            ok, last = cond()
        except StoreError as e:
            ok, last = False, str(e)
        if ok:
            return
        if proc is not None and proc.poll() is not None:
            raise StreamHPSError(
                f"processor exited (code {proc.returncode}) while waiting for {what}; last: {last}"
            )
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}; last seen: {last}")
        time.sleep(0.05)


def wait_for_applied_version(
    store_dir: str | os.PathLike[str],
    table: str,
    version: int,
    timeout: float = 30.0,
    *,
    proc: subprocess.Popen[bytes] | None = None,
) -> None:
    """Block until the store's applied version of ``table`` is >= ``version``."""
    from streamhps.store import LmdbStore

    def cond() -> tuple[bool, Any]:
        if not (Path(store_dir) / "data.mdb").exists():
            return False, "no store yet"
        with LmdbStore.open(store_dir, readonly=True) as st:
            v = st.applied_version(table) if table in st.tables() else None
        return v is not None and v >= version, v

    _wait(f"applied version {version} of {table!r} in {store_dir}", cond, timeout, proc)


def wait_for_offsets(
    store_dir: str | os.PathLike[str],
    offsets: Mapping[tuple[str, int], int],
    timeout: float = 30.0,
    *,
    proc: subprocess.Popen[bytes] | None = None,
) -> None:
    """Block until every ``(topic, partition)`` has a stored next offset >= the given one."""
    from streamhps.store import LmdbStore

    def cond() -> tuple[bool, Any]:
        if not (Path(store_dir) / "data.mdb").exists():
            return False, "no store yet"
        with LmdbStore.open(store_dir, readonly=True) as st:
            have = st.offsets()
        return all(have.get(tp, -1) >= o for tp, o in offsets.items()), have

    _wait(f"offsets {dict(offsets)} in {store_dir}", cond, timeout, proc)


class FakeMessage:
    """A stand-in for a consumed ``confluent_kafka.Message`` (the accessors the code calls), so
    that processor and worker logic can be tested without a broker."""

    def __init__(
        self,
        topic: str,
        partition: int,
        offset: int,
        value: bytes | None,
        key: bytes | None = None,
        error: Any = None,
    ) -> None:
        self._topic, self._partition, self._offset = topic, partition, offset
        self._value, self._key, self._error = value, key, error

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def value(self) -> bytes | None:
        return self._value

    def key(self) -> bytes | None:
        return self._key

    def error(self) -> Any:
        return self._error

    def headers(self) -> list[tuple[str, bytes]] | None:
        return None


class FakeConsumer:
    """A stand-in for a ``confluent_kafka.Consumer`` (no broker) that hands out ``batches`` of
    :class:`FakeMessage` as a consumer fetches them: a batch is what is there at once
    (``consume`` returns up to ``num_messages`` of it), and between two batches one call
    returns nothing (the next fetch has not arrived); after the last, nothing."""

    def __init__(self, batches: list[list[Any]]) -> None:
        self.batches = list(batches)
        self._current: list[Any] = []
        self.calls: list[int] = []  # what each consume call returned, in messages

    def consume(self, num_messages: int, timeout: float) -> list[Any]:
        if not self._current and self.batches:
            self._current = list(self.batches.pop(0))
        out, self._current = self._current[:num_messages], self._current[num_messages:]
        if out and not self._current and self.batches:
            self.batches.insert(0, [])  # the gap before the next fetch
        self.calls.append(len(out))
        return out

    def get_watermark_offsets(self, tp: Any, cached: bool = False) -> tuple[int, int]:
        return (-1001, -1001)  # librdkafka's answer before any fetch of the partition


def write_config(path: str | os.PathLike[str], text: str) -> Path:
    """Write a config TOML (tests build them inline)."""
    p = Path(path)
    p.write_text(text)
    return p


__all__ = [
    "FakeConsumer",
    "FakeMessage",
    "kill_processor",
    "start_processor",
    "stop_processor",
    "wait_for_applied_version",
    "wait_for_offsets",
    "write_config",
]
