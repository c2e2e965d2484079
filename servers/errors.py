"""How the server refuses a request: :class:`HTTPError`, and the library's errors as HTTP answers.

Every refusal goes out as JSON ``{"error": {"type": <kind>, "message": ...}}``
(:func:`streamhps.http_protocol.error_body`); the client raises the streamhps exception of that
name again (:func:`streamhps.http_protocol.error_from_answer`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from streamhps.errors import StreamHPSError
from streamhps.http_protocol import answer_for


class HTTPError(Exception):
    """A request the server refuses: ``status`` and a message that says what was wrong."""

    def __init__(self, status: int, message: str, kind: str = "BadRequest") -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind


@contextlib.contextmanager
def lookup_errors() -> Iterator[None]:
    """The worker's request errors (missing key, another shard's key, stale, unknown table) as
    the HTTP answers of :data:`streamhps.http_protocol.STATUS_OF`."""
    try:
        yield
    except StreamHPSError as e:
        answer = answer_for(e)
        if answer is None:
            raise
        raise HTTPError(answer[0], str(e), answer[1]) from None
