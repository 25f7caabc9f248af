"""The OpenAPI document, completed: a bearer security scheme (so "Try it out" in `/docs` can
send a key) on every route that needs one, and a problem+json schema on every error answer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

from conveyor.api.models import Problem

PROBLEM_MEDIA_TYPE = "application/problem+json"
SCHEME = "bearer"
_SECURITY_SCHEME = {
    "type": "http",
    "scheme": "bearer",
    "description": "an API key (`conveyor keys create`, or one of `CONVEYOR_API_KEYS`); "
                   "`CONVEYOR_METRICS_KEY` for `/metrics`",
}
_COMMON_ERRORS = {
    "422": "invalid request: a bad field or parameter, or a query parameter the route does "
           "not take; `errors` lists each",
    "500": "unexpected error; logged under the request id",
    "503": "Postgres or Redis unavailable, or too busy; retry after `Retry-After`",
}
_UNAUTHORIZED = ("missing, unknown, revoked or expired API key: send "
                 "`Authorization: Bearer <key>`")
_RATE_LIMITED = "over the API key's rate limit; retry after `Retry-After` seconds"
_FASTAPI_ERROR_SCHEMAS = ("HTTPValidationError", "ValidationError")


def install(app: FastAPI, secured: Callable[[str], bool]) -> None:
    """Complete `app`'s generated document once, when it is first asked for. `secured(path)`
    tells whether a path needs a key."""
    generate = app.openapi
    completed = False

    def openapi() -> dict[str, Any]:
        nonlocal completed
        schema = generate()  # FastAPI caches it on the app
        if not completed:
            complete(schema, secured)
            completed = True
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def complete(schema: dict[str, Any], secured: Callable[[str], bool]) -> None:
    """Add the security scheme and the problem schema to `schema`, in place."""
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    problem = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(problem.pop("$defs", {}))
    schemas["Problem"] = problem
    components.setdefault("securitySchemes", {})[SCHEME] = _SECURITY_SCHEME
    problem_content = {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}}
    for path, item in schema.get("paths", {}).items():
        for operation in item.values():
            responses = operation.setdefault("responses", {})
            if path.startswith("/v1/"):
                for code, description in _COMMON_ERRORS.items():
                    responses.setdefault(code, {"description": description})
            if secured(path):
                operation["security"] = [{SCHEME: []}]
                responses.setdefault("401", {"description": _UNAUTHORIZED})
                responses.setdefault("429", {"description": _RATE_LIMITED})
            else:
                operation["security"] = []
            for code, response in responses.items():
                if code[:1] in ("4", "5"):
                    response["content"] = problem_content
            operation["responses"] = dict(sorted(responses.items()))
    for name in _FASTAPI_ERROR_SCHEMAS:  # no longer referenced: every error is a Problem
        schemas.pop(name, None)
