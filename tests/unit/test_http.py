"""`conveyor.http`: problem+json → the error class, and when a 503 is retried."""

from __future__ import annotations

import email.utils
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from conveyor import http
from conveyor.errors import ConveyorError

PROBLEM = {"content-type": "application/problem+json"}


def answer(status: int, body: Any = None, **headers: str) -> httpx.Response:
    if body is None:
        return httpx.Response(status, text="upstream broke", headers=headers)
    return httpx.Response(status, json=body, headers={**PROBLEM, **headers})


def problem(status: int, title: str, **extra: Any) -> dict[str, Any]:
    return {"type": "about:blank", "title": title, "status": status, "detail": "why",
            "request_id": "r-1", **extra}


@pytest.mark.parametrize(("response", "kind"), [
    (answer(400, problem(400, "Malformed JSON")), http.BadRequest),
    (answer(401, problem(401, "Unauthorized")), http.Unauthorized),
    (answer(404, problem(404, "Task not found")), http.TaskNotFound),
    (answer(404, problem(404, "Not found")), http.NotFound),
    (answer(409, problem(409, "Conflict", status_now="running")), http.InvalidTransition),
    (answer(409, problem(409, "Idempotency key reused")), http.Conflict),
    (answer(413, problem(413, "Payload too large")), http.TooLarge),
    (answer(422, problem(422, "Unknown task type")), http.UnknownTaskType),
    (answer(422, problem(422, "Invalid request", errors=[
        {"path": "type", "type": "literal_error", "message": "x"}])), http.UnknownTaskType),
    (answer(422, problem(422, "Invalid request", errors=[
        {"path": "tasks.0", "type": "union_tag_invalid", "message": "x"}])), http.UnknownTaskType),
    (answer(422, problem(422, "Invalid payload")), http.PayloadInvalid),
    (answer(422, problem(422, "Invalid request", errors=[
        {"path": "tasks.3.payload.width", "type": "int_parsing", "message": "x"}])),
     http.PayloadInvalid),
    (answer(422, problem(422, "Invalid request", errors=[
        {"path": "delay_seconds", "type": "less_than_equal", "message": "x"}])),
     http.InvalidRequest),
    (answer(503, problem(503, "Overloaded"), **{"retry-after": "3"}), http.Unavailable),
    (answer(415, problem(415, "Unsupported media type")), http.ApiError),
    (answer(502), http.ApiError),
])
def test_each_problem_becomes_the_error_named_for_it(
    response: httpx.Response, kind: type[http.ApiError]
) -> None:
    error = http.error_from(response)
    assert type(error) is kind
    assert isinstance(error, ConveyorError)
    assert error.status == response.status_code


def test_an_error_keeps_the_problem_and_its_field_errors() -> None:
    body = problem(422, "Invalid request", errors=[
        {"path": "payload.width", "loc": ["payload", "width"], "message": "not an int",
         "type": "int_parsing"}])
    error = http.error_from(answer(422, body))
    assert isinstance(error, http.PayloadInvalid)
    assert (error.title, error.detail, error.request_id) == ("Invalid request", "why", "r-1")
    assert error.errors == [http.FieldError(path="payload.width", loc=["payload", "width"],
                                            message="not an int", type="int_parsing")]
    assert error.problem == body
    assert str(error) == "422 Invalid request: why"


def test_a_non_json_error_keeps_its_text() -> None:
    error = http.error_from(answer(502))
    assert error.detail == "upstream broke"


def test_retry_after_in_seconds_or_as_a_date() -> None:
    seconds = http.error_from(answer(503, problem(503, "x"), **{"retry-after": "2"}))
    assert isinstance(seconds, http.Unavailable)
    assert seconds.retry_after_s == 2.0
    soon = email.utils.format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    dated = http.error_from(answer(503, problem(503, "x"), **{"retry-after": soon}))
    assert isinstance(dated, http.Unavailable)
    assert dated.retry_after_s is not None
    assert 25 < dated.retry_after_s <= 30
    none = http.error_from(answer(503, problem(503, "x")))
    assert isinstance(none, http.Unavailable)
    assert none.retry_after_s is None


def test_only_503_is_retried_and_only_so_often_and_so_long() -> None:
    client = http.Client("http://x", retries=2, max_retry_wait_s=5.0)
    busy = answer(503, problem(503, "x"), **{"retry-after": "60"})
    assert client._wait_before_retry(busy, 1) == 5.0  # Retry-After, capped
    assert client._wait_before_retry(busy, 2) == 5.0
    assert client._wait_before_retry(busy, 3) is None  # two retries spent
    assert client._wait_before_retry(answer(500, problem(500, "x")), 1) is None
    bare = answer(503, problem(503, "x"))
    assert client._wait_before_retry(bare, 1) == 0.5  # no Retry-After: backoff
    assert client._wait_before_retry(bare, 2) == 1.0
    assert http.Client("http://x")._wait_before_retry(busy, 1) is None  # retries=0
    client.close()


def test_the_api_key_is_a_bearer_token() -> None:
    with http.Client("http://x/", api_key="k") as client:
        assert client.http.headers["authorization"] == "Bearer k"
        assert client.base_url == "http://x"
    with http.Client("http://x") as anonymous:
        assert "authorization" not in anonymous.http.headers
