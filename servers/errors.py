"""How the server refuses a request: :class:`HTTPError`, and the worker's errors as HTTP answers.

Every refusal goes out as JSON ``{"error": {"type": <kind>, "message": ...}}``; the client
maps ``type`` back to the streamhps exception of that name.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from streamhps.errors import MissingKeyError, NotOwnedError, StaleReadError, UnknownTableError


class HTTPError(Exception):
    """A request the server refuses: ``status`` and a message that says what was wrong."""

    def __init__(self, status: int, message: str, kind: str = "BadRequest") -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind


@contextlib.contextmanager
def lookup_errors() -> Iterator[None]:
    """Worker errors of a lookup as the HTTP answers clients map back to exceptions."""
    try:
        yield
    except MissingKeyError as e:
        raise HTTPError(404, str(e), "MissingKeyError") from None
    except NotOwnedError as e:  # 421 Misdirected Request: ask the shard that serves the key
        raise HTTPError(421, str(e), "NotOwnedError") from None
    except StaleReadError as e:  # ShardUnavailableError too (a main whose shard is down)
        raise HTTPError(503, str(e), type(e).__name__) from None
    except UnknownTableError as e:
        raise HTTPError(404, str(e), "UnknownTableError") from None
