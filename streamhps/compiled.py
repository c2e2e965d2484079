"""How the library compiles its hot loops: numba, without the GIL, cached on disk.

A compiled call releases the GIL for its whole length: a thread running one does not hold up
the worker's other threads, and it gives the GIL up once instead of once per numpy step
(numpy releases it inside each large-enough step, and every hand-over back waits for the
interpreter while other threads want it).
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

#: functions compiled without numba's on-disk cache (:func:`kernel`)
uncached: list[str] = []


def kernel(fn: Callable[..., Any]) -> Any:
    """``njit(nogil=True, cache=True)``; where numba finds no writable place for its cache (the
    package's ``__pycache__`` read-only, no user cache directory, no ``NUMBA_CACHE_DIR``),
    without the cache: every process then compiles on first use (seconds), instead of failing
    to import."""
    from numba import njit

    try:
        return njit(nogil=True, cache=True)(fn)
    except RuntimeError as e:  # numba: "cannot cache function ...: no locator available"
        if not uncached:
            log.warning(
                "streamhps's compiled code cannot be cached (%s): every process compiles it "
                "on first use (seconds); set NUMBA_CACHE_DIR to a writable directory to "
                "compile once", e,
            )  # fmt: skip
        uncached.append(fn.__name__)
        return njit(nogil=True)(fn)


def lazy_kernel(fn: Callable[..., Any]) -> Callable[..., Any]:
    """:func:`kernel`, made (and numba imported, ~0.25 s) on the first call: for the modules
    ``import streamhps`` loads, so that importing the package stays fast. Called from Python
    only (compiled callers need :func:`kernel`'s dispatcher)."""
    made: list[Any] = []
    lock = threading.Lock()

    @functools.wraps(fn)
    def call(*args: Any) -> Any:
        if not made:
            with lock:
                if not made:
                    made.append(kernel(fn))
        return made[0](*args)

    return call
