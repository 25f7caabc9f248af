"""Exceptions → application/problem+json: status, title, detail, request id, and for
validation errors the failing field paths.  [error mapping]

Anything unexpected is a 500 whose body says only that; the traceback goes to the log.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response

from conveyor.api.models import RATE_PATTERN
from conveyor.api.responses import problem
from conveyor.errors import (
    ConveyorError,
    Forbidden,
    IdempotencyConflict,
    InvalidTransition,
    KeyNotFound,
    Overloaded,
    PayloadInvalid,
    RateLimited,
    TaskNotFound,
    Unauthorized,
    Unavailable,
    UnknownTaskType,
    WorkflowInvalid,
    WorkflowNotFound,
)
from conveyor.tasks.thumbnail import BASE64

log = structlog.get_logger("conveyor.api")


def request_id_of(request: Request) -> str | None:
    rid = request.scope.get("state", {}).get("request_id")
    return str(rid) if rid else None


def _field_path(loc: Sequence[Any], type_names: set[str]) -> list[str | int]:
    """Drop FastAPI's `body` root and pydantic's union tag (the task type) from a location."""
    path = list(loc)
    if path and path[0] == "body":
        path = path[1:]
    cleaned: list[str | int] = []
    for i, part in enumerate(path):
        previous = path[i - 1] if i else None
        if isinstance(part, str) and part in type_names and (i == 0 or isinstance(previous, int)):
            continue
        cleaned.append(part)
    return cleaned


# Patterns whose pydantic message would show the regex: what they mean instead.
_PATTERNS = {
    RATE_PATTERN: "not a rate: write N/s, N/m or N/h (optionally with ', burst=B'), or 'off'",
    BASE64: "not base64 (A-Z, a-z, 0-9, '+' and '/', '=' padding at the end only)",
}


def _explained(error: dict[str, Any], path: list[str | int],
               type_names: set[str]) -> tuple[list[str | int], str]:
    """The path and message of one pydantic error, in the API's words where pydantic's own
    name a discriminator, show a regex or prefix a validator's text."""
    kind, message = error.get("type"), str(error.get("msg", "invalid"))
    ctx = error.get("ctx") or {}
    if kind == "union_tag_invalid":
        known = ", ".join(sorted(type_names)) or "none"
        return [*path, "type"], (f"no task type named {ctx.get('tag')!r}; registered types: "
                                 f"{known}")
    if kind == "union_tag_not_found":
        return [*path, "type"], "Field required (the task type)"
    if kind == "json_invalid":
        at = error.get("loc", ())[-1]
        return [], f"{ctx.get('error', message)} at character {at}"
    if kind == "string_pattern_mismatch" and ctx.get("pattern") in _PATTERNS:
        return path, _PATTERNS[ctx["pattern"]]
    if kind == "literal_error" and path and path[-1] == "priority" \
            and ctx.get("expected") == "'default'":
        return path, ("this task type has no priorities (it is not declared with "
                      "priorities=True): leave priority out, or give 'default'")
    if kind == "value_error":
        message = message.removeprefix("Value error, ")
    return path, message


def install(app: FastAPI, type_names: set[str]) -> None:
    """Register the exception handlers on `app`."""

    async def validation(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        errors = []
        malformed = False
        for error in exc.errors():
            if error.get("type") == "json_invalid":
                malformed = True
            path, message = _explained(error, _field_path(error.get("loc", ()), type_names),
                                       type_names)
            errors.append({
                "path": ".".join(str(p) for p in path) or "(body)",
                "loc": path,
                "message": message,
                "type": error.get("type", "value_error"),
            })
        if malformed:
            detail = "the request body is not valid JSON: " + errors[0]["message"]
            return problem(400, "Malformed JSON", detail, request_id=request_id_of(request),
                           errors=errors)
        detail = "; ".join(f"{e['path']}: {e['message']}" for e in errors[:10])
        return problem(422, "Invalid request", detail, request_id=request_id_of(request),
                       errors=errors)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        title = {404: "Not found", 405: "Method not allowed",
                 415: "Unsupported media type"}.get(exc.status_code, "HTTP error")
        return problem(exc.status_code, title, str(exc.detail),
                       request_id=request_id_of(request),
                       headers=dict(exc.headers) if exc.headers else None)

    async def conveyor_error(request: Request, exc: Exception) -> Response:
        rid = request_id_of(request)
        if isinstance(exc, Unauthorized):
            return problem(401, "Unauthorized", str(exc), request_id=rid,
                           headers={"WWW-Authenticate": "Bearer"})
        if isinstance(exc, Forbidden):
            named: dict[str, Any] = {"scope": exc.scope} if exc.scope else {"types": exc.types}
            return problem(403, "Forbidden", str(exc), request_id=rid, **named)
        if isinstance(exc, RateLimited):
            return problem(429, "Too many requests", str(exc), request_id=rid,
                           headers={"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))})
        if isinstance(exc, KeyNotFound):
            return problem(404, "Key not found", f"no API key is named {exc}", request_id=rid)
        if isinstance(exc, TaskNotFound):
            return problem(404, "Task not found", f"no task has id {exc}", request_id=rid)
        if isinstance(exc, InvalidTransition):
            return problem(409, "Conflict", str(exc), request_id=rid, status_now=exc.status)
        if isinstance(exc, IdempotencyConflict):
            conflicts = [{"index": r.index, "type": r.type, "idempotency_key": r.key,
                          "task_id": r.task_id, "first_index": r.first_index}
                         for r in exc.reused]
            return problem(409, "Idempotency key reused", str(exc), request_id=rid,
                           conflicts=conflicts)
        if isinstance(exc, UnknownTaskType):
            known = ", ".join(sorted(type_names)) or "none"
            return problem(422, "Unknown task type",
                           f"no task type named {exc}; registered types: {known}",
                           request_id=rid)
        if isinstance(exc, PayloadInvalid):
            return problem(422, "Invalid payload", str(exc), request_id=rid)
        if isinstance(exc, WorkflowInvalid):
            return problem(422, "Invalid workflow", str(exc), request_id=rid, rule=exc.what)
        if isinstance(exc, WorkflowNotFound):
            return problem(404, "Workflow not found", f"no workflow has id {exc}",
                           request_id=rid)
        if isinstance(exc, Overloaded):
            retry_after = str(max(1, round(exc.retry_after_s)))
            return problem(503, "Overloaded", str(exc), request_id=rid,
                           headers={"Retry-After": retry_after})
        if isinstance(exc, Unavailable):
            log.warning("api.unavailable", op=exc.op, error=exc.detail, request_id=rid)
            return problem(503, "Service unavailable",
                           f"a backing service is not answering ({exc.op}); try again shortly",
                           request_id=rid, headers={"Retry-After": "2"})
        return problem(400, "Bad request", str(exc), request_id=rid)

    async def unexpected(request: Request, exc: Exception) -> Response:
        rid = request_id_of(request)
        log.error("api.error", request_id=rid, path=request.url.path, exc_info=exc)
        # This handler runs outside the request-id middleware: set the header here.
        return problem(500, "Internal server error",
                       "the server failed to answer; the error is logged under this request id",
                       request_id=rid, headers={"X-Request-ID": rid} if rid else None)

    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(ConveyorError, conveyor_error)
    app.add_exception_handler(Exception, unexpected)
