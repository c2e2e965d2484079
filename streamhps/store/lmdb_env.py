"""LMDB environments of the stores: one handle per file per process, and why an open failed.

LMDB allows one environment handle per file per process, so stores opened twice share it
(reference-counted). Before anything is read, a ``data.mdb`` shorter than its header says is
refused (a read past the end of the memory map would kill the process with SIGBUS); every open
error is turned into a message naming the file and what the operator can do.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

import lmdb

from streamhps.errors import StoreError

log = logging.getLogger(__name__)


# LMDB allows one environment handle per file per process: stores opened twice share it.
_ENVS: dict[str, list[Any]] = {}  # realpath -> [env, refcount, readonly]
_ENVS_LOCK = threading.Lock()


def acquire_env(p: Path, readonly: bool, **opts: Any) -> lmdb.Environment:
    key = os.path.realpath(p)
    with _ENVS_LOCK:
        entry = _ENVS.get(key)
        if entry is not None:
            if entry[2] and not readonly:
                raise StoreError(
                    f"{p} is already open read-only in this process; close it before opening it writable"
                )
            entry[1] += 1
            return entry[0]
        try:
            env = lmdb.open(
                str(p), readonly=readonly, max_dbs=4096, lock=True, mode=0o700, readahead=False,
                create=not readonly, **opts,
            )  # fmt: skip
        except lmdb.Error as e:
            raise StoreError(open_error(p, e)) from e
        short = _missing_bytes(env, p)
        if short:
            env.close()
            raise StoreError(
                f"{p / 'data.mdb'} is truncated: its pages end {short} bytes short of what its "
                "header says it holds (a partial copy, or a full disk). Restore the store from a "
                "snapshot (streamhps snapshot), or move the directory away and let the processor "
                "rebuild it from the stream (it replays what the brokers still retain)"
            )
        cleared = env.reader_check()
        if cleared:
            log.warning("cleared %d stale LMDB reader slot(s) of dead processes in %s", cleared, p)
        _ENVS[key] = [env, 1, readonly]
        return env


_DAMAGED = (
    lmdb.InvalidError, lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.VersionMismatchError,
    lmdb.BadRslotError, lmdb.PanicError,
)  # fmt: skip


def _missing_bytes(env: lmdb.Environment, p: Path) -> int:
    """How many bytes ``data.mdb`` lacks of the pages its meta page counts (0: complete). A
    read of a page past the end of the memory map kills the process with SIGBUS, so this is
    checked before any read."""
    needed = (int(env.info()["last_pgno"]) + 1) * int(env.stat()["psize"])
    try:
        have = os.path.getsize(p / "data.mdb")
    except OSError:
        return 0
    return max(0, needed - have)


def open_error(p: Path, e: lmdb.Error) -> str:
    """What went wrong opening the store at ``p``, and what the operator can do about it."""
    text = str(e).replace("\n", " ").strip()
    try:
        tiny = (p / "data.mdb").stat().st_size < 2 * 4096  # not even the two meta pages
    except OSError:
        tiny = False
    if isinstance(e, _DAMAGED) or tiny:
        return (
            f"{p / 'data.mdb'} is not a usable LMDB file ({text}): it is truncated or corrupted. "
            "Restore the store from a snapshot (streamhps snapshot), or move the directory "
            "away and let the processor rebuild it from the stream (it replays what the "
            "brokers still retain)"
        )
    if isinstance(e, lmdb.ReadonlyError) or "ermission denied" in text or "ead-only" in text:
        return (
            f"cannot open the LMDB store at {p} ({text}): every process, readers too, "
            f"registers in {p / 'lock.mdb'}, so the directory (or an existing lock.mdb) must "
            "be writable by this user. On a read-only volume, copy a snapshot (streamhps "
            "snapshot) to a writable directory and serve that"
        )
    return f"cannot open the LMDB store at {p}: {text}"


def release_env(p: Path) -> None:
    key = os.path.realpath(p)
    with _ENVS_LOCK:
        entry = _ENVS.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del _ENVS[key]
            if not entry[2]:
                # a clean stop is on disk whatever sync says (py-lmdb Environment.sync)
                entry[0].sync(True)
            entry[0].close()
