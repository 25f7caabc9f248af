"""The OpenAPI document, completed: a bearer security scheme (so "Try it out" in `/docs` can
send a key) on every route that needs one, a problem+json schema on every error answer, and
on the request bodies PostgreSQL stores, the rule that their strings hold no NUL."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

from conveyor.api.models import Problem
from conveyor.validation import mark_storable, storable_json_schema

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
_COMPONENT = "#/components/schemas/"
_ANY = "StorableJson"
_ANY_REF = _COMPONENT + _ANY


def install(app: FastAPI, secured: Callable[[str], bool], stored: Callable[[str], bool]) -> None:
    """Complete `app`'s generated document once, when it is first asked for. `secured(path)`
    tells whether a path needs a key, `stored(path)` whether its request bodies are stored in
    PostgreSQL (so their strings cannot hold NUL)."""
    generate = app.openapi
    completed = False

    def openapi() -> dict[str, Any]:
        nonlocal completed
        schema = generate()  # FastAPI caches it on the app
        if not completed:
            complete(schema, secured, stored)
            completed = True
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def complete(
    schema: dict[str, Any], secured: Callable[[str], bool],
    stored: Callable[[str], bool] = lambda path: False,
) -> None:
    """Add the security scheme, the problem schema and the storable-text rule to `schema`, in
    place."""
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
    _mark_stored_bodies(schema, stored)


def _mark_stored_bodies(schema: dict[str, Any], stored: Callable[[str], bool]) -> None:
    """The request bodies PostgreSQL stores, and every schema they use, say that no string or
    key in them may hold NUL (see `conveyor.validation`)."""
    schemas = schema["components"]["schemas"]
    names: set[str] = set()
    for path, item in schema.get("paths", {}).items():
        if not stored(path):
            continue
        for operation in item.values():
            for media in operation.get("requestBody", {}).get("content", {}).values():
                if "$ref" not in media.get("schema", {}):
                    media["schema"] = mark_storable(media.get("schema", {}), _ANY_REF)
                _referenced(media["schema"], schemas, names)
    if not names:
        return
    for name in names:
        schemas[name] = mark_storable(schemas[name], _ANY_REF)
    schemas[_ANY] = storable_json_schema(_ANY_REF)


def _referenced(node: Any, schemas: dict[str, Any], names: set[str]) -> None:
    """Add to `names` each component schema `node` refers to, directly or not."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith(_COMPONENT):
            name = ref[len(_COMPONENT):]
            if name not in names and name in schemas:
                names.add(name)
                _referenced(schemas[name], schemas, names)
        for value in node.values():
            _referenced(value, schemas, names)
    elif isinstance(node, list):
        for value in node:
            _referenced(value, schemas, names)
