"""The inference server's HTTP protocol, shared by the server (``servers/``) and the clients.

Routes and their methods, the header names of binary answers, the layout of a multi-table
answer, and the error contract: every refusal is JSON ``{"error": {"type": KIND, "message":
...}}`` with an HTTP status; ``KIND`` is the name of a streamhps exception, which the client
raises again with ``status`` and ``kind`` set (:func:`error_from_answer`). The statuses the
server gives the library's exceptions are in :data:`STATUS_OF`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from streamhps.errors import (
    MissingKeyError,
    NotOwnedError,
    ServerError,
    ShardUnavailableError,
    StaleReadError,
    StreamHPSError,
    UnknownTableError,
)

# ---------------------------------------------------------------- routes

PAGE = "/"
FAVICON = "/favicon.ico"
HEALTHZ = "/healthz"
READYZ = "/readyz"
METRICS = "/metrics"
STATUS = "/v1/status"
HISTORY = "/v1/history"
LOOKUP = "/v1/lookup"
LOOKUP_MANY = "/v1/lookup_many"
PREDICT = "/v1/predict"

ROUTES: dict[str, tuple[str, ...]] = {
    PAGE: ("GET",),
    HEALTHZ: ("GET",),
    READYZ: ("GET",),
    METRICS: ("GET",),
    STATUS: ("GET",),
    HISTORY: ("GET",),
    LOOKUP: ("POST",),
    LOOKUP_MANY: ("POST",),
    PREDICT: ("POST",),
    FAVICON: ("GET",),
}
"""Path -> the methods it answers (others: 405 with ``Allow``; unknown paths: 404)."""

UNAUTHENTICATED = (HEALTHZ,)
"""Routes that answer without the bearer token of a server run with ``--auth-token-file``."""

# ---------------------------------------------------------------- bodies and headers

JSON = "application/json"
BINARY = "application/octet-stream"

DTYPE_HEADER = "X-Streamhps-Dtype"
"""Binary lookup answer: numpy's little-endian type string of the rows (e.g. ``<f4``)."""
SHAPE_HEADER = "X-Streamhps-Shape"
"""Binary lookup answer: ``n,dim``; binary predict answer: ``n`` (scores)."""
LAYOUT_HEADER = "X-Streamhps-Layout"
"""Multi-table answer: :func:`encode_layout`."""
DENSE_VERSION_HEADER = "X-Streamhps-Dense-Version"
"""Binary predict answer: the version of the dense model that computed the scores."""


def encode_layout(rows: Mapping[str, np.ndarray]) -> str:
    """``X-Streamhps-Layout`` of a multi-table answer: ``table:dtype:n:dim,...`` (dtype as numpy's
    little-endian type string, e.g. ``<f4``), in body order."""
    return ",".join(
        f"{t}:{a.dtype.newbyteorder('<').str}:{a.shape[0]}:{a.shape[1] if a.ndim == 2 else 0}"
        for t, a in rows.items()
    )


def decode_rows(layout: str, data: bytes) -> dict[str, np.ndarray]:
    """Split a multi-table answer body by its layout header (zero-copy views)."""
    out: dict[str, np.ndarray] = {}
    off = 0
    for item in filter(None, layout.split(",")):
        table, dt, n, dim = item.rsplit(":", 3)
        dtype = np.dtype(dt)
        count = int(n) * int(dim)
        a = np.frombuffer(data, dtype=dtype, count=count, offset=off).reshape(int(n), int(dim))
        out[table] = a.astype(dtype.newbyteorder("="), copy=False)
        off += count * dtype.itemsize
    if off != len(data):
        raise ServerError(f"lookup_many answer is {len(data)} bytes but its layout says {off}")
    return out


# ---------------------------------------------------------------- errors

STATUS_OF: dict[type[StreamHPSError], int] = {
    MissingKeyError: 404,
    UnknownTableError: 404,
    NotOwnedError: 421,  # Misdirected Request: ask the shard that serves the key
    ShardUnavailableError: 503,
    StaleReadError: 503,
}
"""The HTTP status of a library error raised while answering a request (most specific first);
the client raises the same class again from the answer."""

_BY_KIND: dict[str, type[StreamHPSError]] = {cls.__name__: cls for cls in STATUS_OF}


def answer_for(exc: BaseException) -> tuple[int, str] | None:
    """``(status, kind)`` of the answer to a request that raised ``exc`` (see
    :data:`STATUS_OF`); None if it is not one of the request errors."""
    for cls, status in STATUS_OF.items():
        if isinstance(exc, cls):
            return status, cls.__name__
    return None


def error_body(kind: str, message: str) -> dict[str, Any]:
    """The JSON body of a refusal."""
    return {"error": {"type": kind, "message": message}}


def error_from_answer(status: int, data: bytes) -> StreamHPSError:
    """The exception an error answer stands for: the class the server named (else
    :class:`~streamhps.errors.ServerError`), with ``status`` and ``kind`` set."""
    kind, message = "ServerError", data[:500].decode(errors="replace")
    try:
        err = json.loads(data)["error"]
        kind, message = str(err["type"]), str(err["message"])
    except (ValueError, KeyError, TypeError):
        pass
    exc = _BY_KIND.get(kind, ServerError)(f"{message} (HTTP {status})")
    exc.status = status
    exc.kind = kind
    return exc
