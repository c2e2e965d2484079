"""Read consistency of a lookup, named once for the worker, the server and the clients.

``eventual`` answers from whatever the worker holds (however far behind the stream it is);
``bounded`` refuses with :class:`~streamhps.errors.StaleReadError` while the table is further
behind the head of the stream than ``serving.max_staleness_s``.
"""

from __future__ import annotations

from typing import Any

from streamhps.errors import ValidationError

EVENTUAL = "eventual"
BOUNDED = "bounded"
CONSISTENCY = (EVENTUAL, BOUNDED)


def check_consistency(value: Any, error: type[Exception] = ValidationError) -> str:
    """``value`` if it names a consistency level, else ``error`` saying which there are."""
    if value not in CONSISTENCY:
        raise error(f"consistency must be one of {list(CONSISTENCY)}, got {value!r}")
    return str(value)
