"""JSON responses rendered with orjson (dataclasses, UUIDs and datetimes natively)."""

from __future__ import annotations

import uuid
from typing import Any

import orjson
from starlette.responses import JSONResponse


def _default(value: Any) -> Any:
    if isinstance(value, uuid.UUID):  # asyncpg's own UUID subclass, which orjson does not know
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


class OrjsonResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, default=_default)


class ProblemResponse(OrjsonResponse):
    """An RFC 9457 problem body."""

    media_type = "application/problem+json"


def problem(
    status: int,
    title: str,
    detail: str,
    *,
    request_id: str | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> ProblemResponse:
    body: dict[str, Any] = {"type": "about:blank", "title": title, "status": status,
                            "detail": detail}
    if request_id:
        body["request_id"] = request_id
    body.update(extra)
    return ProblemResponse(body, status_code=status, headers=headers)
