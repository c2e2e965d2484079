"""The HTTP protocol shared by server and client: a request error crosses the wire and comes
back as the same exception class, with the status and kind declared on the class."""

from __future__ import annotations

import json

import pytest

from streamhps.errors import ServerError, ShardUnavailableError, StaleReadError, StreamHPSError
from streamhps.http_protocol import STATUS_OF, answer_for, error_body, error_from_answer


@pytest.mark.parametrize("cls", list(STATUS_OF), ids=lambda c: c.__name__)
def test_a_request_error_comes_back_as_its_own_class(cls: type[StreamHPSError]) -> None:
    answer = answer_for(cls("what was wrong"))
    assert answer is not None
    status, kind = answer
    back = error_from_answer(status, json.dumps(error_body(kind, "what was wrong")).encode())
    assert type(back) is cls
    assert (back.status, back.kind) == (status, cls.__name__)
    assert "what was wrong" in str(back) and f"HTTP {status}" in str(back)


def test_the_most_specific_class_decides_the_answer() -> None:
    assert answer_for(ShardUnavailableError("down")) == (503, "ShardUnavailableError")
    assert answer_for(StaleReadError("late")) == (503, "StaleReadError")
    assert answer_for(StreamHPSError("other")) is None


def test_an_answer_that_is_not_the_error_json_is_a_server_error() -> None:
    exc = error_from_answer(502, b"<html>bad gateway</html>")
    assert type(exc) is ServerError and exc.status == 502 and "bad gateway" in str(exc)
    assert StreamHPSError("local").status is None  # raised here, not from an answer
