"""DirectRoute: a FastAPI route that answers without FastAPI's general dependency solver.

FastAPI solves a route's dependency tree anew on every request: per dependency a cache key,
a scope check, generator and thread-pool tests. On `POST /v1/tasks` that was a third of the
API's CPU per request. A route of this class flattens its tree once, when FastAPI builds its
handler, into the calls FastAPI would make, in FastAPI's order; path, query and body values are
still validated by FastAPI's own functions, so the values, the errors and the 4xx answers are
FastAPI's. A route that needs anything else (a generator, security scopes, header or cookie
parameters, a form body, background tasks, an endpoint that returns no `Response`) keeps
FastAPI's handler, and so does every request while FastAPI's telemetry is recording one or
dependency overrides are set.

The plan reads FastAPI's route state, some of it private (an included route's context, its
`_embed_body_fields`): the lock file pins FastAPI, and `tests/unit/api/test_direct.py`
compares the two handlers request by request.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import params
from fastapi.datastructures import DefaultPlaceholder
from fastapi.dependencies.models import Dependant
from fastapi.dependencies.utils import request_body_to_args, request_params_to_args
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from fastapi.telemetry import get_telemetry_data
from pydantic_core import PydanticUndefined
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

try:  # the FastAPI internals the plan mirrors; another FastAPI keeps its own handler
    from fastapi.dependencies.utils import _get_param_model
    from fastapi.routing import _effective_route_context_var, _extract_endpoint_context
except ImportError:  # pragma: no cover - depends on the installed FastAPI
    MIRRORED = False
else:
    MIRRORED = True

if TYPE_CHECKING:
    from fastapi.exceptions import EndpointContext

Handler = Callable[[Request], Coroutine[Any, Any, Response]]


@dataclass(frozen=True, slots=True)
class _Call:
    """A dependency (its callable is read from it at each call, as FastAPI does), its own
    dependencies, and the key its value is shared under within a request."""

    dependant: Dependant
    dependencies: tuple[_Call, ...]

    @property
    def key(self) -> tuple[Any, str]:
        return self.dependant.call, self.dependant.scope or ""


class DirectRoute(APIRoute):
    """An `APIRoute` whose plain dependencies are called directly (see the module)."""

    def get_route_handler(self) -> Handler:
        general = super().get_route_handler()
        if not MIRRORED:
            return general
        route: Any = self
        # FastAPI builds the handler of an included route with the router's dependencies
        # added (its "effective context"): the plan is made of the same.
        context = _effective_route_context_var.get()
        if context is not None and context.original_route is self:
            route = context
        strict = getattr(route, "strict_content_type", True)
        if isinstance(strict, DefaultPlaceholder):
            strict = strict.value
        if not strict:  # a body without a content type is read as JSON: FastAPI's handler
            return general
        plan = _plan(route.dependant, route.body_field, route._embed_body_fields,
                     route.dependency_overrides_provider)
        if plan is None:
            return general
        return plan.handler(general)


@dataclass(frozen=True, slots=True)
class _Plan:
    dependant: Dependant
    dependencies: tuple[_Call, ...]
    json_body: bool  # the route takes a body (read as FastAPI reads it)
    embed_body_fields: bool
    overrides: Any
    # The query values of a request without a query string, when each is an optional
    # parameter whose default is an immutable constant (what FastAPI would give); else None.
    query_defaults: dict[str, Any] | None

    def handler(self, general: Handler) -> Handler:
        dependant = self.dependant
        context = _extract_endpoint_context(dependant.call)

        async def direct(request: Request) -> Response:
            overridden = self.overrides is not None and getattr(
                self.overrides, "dependency_overrides", None)
            if overridden or get_telemetry_data() is not None:
                return await general(request)
            body = (await _read_body(request, dependant, context) if self.json_body
                    else PydanticUndefined)
            cache: dict[tuple[Any, str], Any] = {}
            values: dict[str, Any] = {}
            for dependency in self.dependencies:
                value = await _solve(dependency, request, cache)
                if dependency.dependant.name is not None:
                    values[dependency.dependant.name] = value
            errors: list[Any] = []
            if dependant.path_params:
                found, errors = request_params_to_args(dependant.path_params,
                                                       request.path_params)
                values.update(found)
            if not dependant.query_params:
                pass
            elif self.query_defaults is not None and not request.scope.get("query_string"):
                values.update(self.query_defaults)
            else:
                found, wrong = request_params_to_args(dependant.query_params,
                                                      request.query_params)
                values.update(found)
                errors += wrong
            if dependant.body_params:
                found, wrong = await request_body_to_args(
                    body_fields=dependant.body_params, received_body=body,
                    embed_body_fields=self.embed_body_fields)
                values.update(found)
                errors += wrong
            if errors:
                raise RequestValidationError(
                    errors, body=None if body is PydanticUndefined else body,
                    endpoint_ctx=_at(request, dependant, context))
            if dependant.request_param_name:
                values[dependant.request_param_name] = request
            endpoint: Any = dependant.call
            response = await endpoint(**values)
            if not isinstance(response, Response):
                raise TypeError(f"{endpoint.__name__} returned no Response")
            return response

        return direct


async def _solve(dependency: _Call, request: Request, cache: dict[tuple[Any, str], Any]
                 ) -> Any:
    """As FastAPI solves a dependency: its own dependencies first (each from the cache or
    called), then its value from the cache or called."""
    kwargs: dict[str, Any] = {}
    for sub in dependency.dependencies:
        value = await _solve(sub, request, cache)
        if sub.dependant.name is not None:
            kwargs[sub.dependant.name] = value
    dependant, key = dependency.dependant, dependency.key
    if dependant.use_cache and key in cache:
        return cache[key]
    if dependant.request_param_name is not None:
        kwargs[dependant.request_param_name] = request
    call: Any = dependant.call
    value = await call(**kwargs)
    cache.setdefault(key, value)
    return value


async def _read_body(request: Request, dependant: Dependant, context: EndpointContext) -> Any:
    """The body as FastAPI's handler reads it: JSON for a JSON content type (as the email
    package parses one), the bytes for any other, undefined when empty; a JSON syntax error as
    the validation error FastAPI raises."""
    try:
        raw = await request.body()
        if not raw:
            return PydanticUndefined
        media = (request.headers.get("content-type") or "").partition(";")[0].strip().lower()
        main, _, sub = media.partition("/")
        if (main == "application" and "/" not in sub
                and (sub == "json" or sub.endswith("+json"))):
            return await request.json()
        return raw
    except json.JSONDecodeError as exc:
        raise RequestValidationError(
            [{"type": "json_invalid", "loc": ("body", exc.pos), "msg": "JSON decode error",
              "input": {}, "ctx": {"error": exc.msg}}], body=exc.doc,
            endpoint_ctx=_at(request, dependant, context)) from exc
    except HTTPException:
        raise
    except Exception as exc:
        raise HTTPException(400, "There was an error parsing the body") from exc


def _at(request: Request, dependant: Dependant, context: EndpointContext) -> EndpointContext:
    """Where a validation error arose, as FastAPI says it: the endpoint and the route."""
    if not dependant.path:
        return context
    mount = request.scope.get("root_path", "").rstrip("/")
    return {**context, "path": f"{request.method} {mount}{dependant.path}"}


def _plan(dependant: Dependant, body_field: Any, embed_body_fields: bool, overrides: Any
          ) -> _Plan | None:
    """The flat plan of a route FastAPI would solve with no more than plain calls; None for
    any other."""
    endpoint = dependant.call
    if (endpoint is None or not inspect.iscoroutinefunction(endpoint)
            or not _returns_response(endpoint)):
        return None
    if (dependant.header_params or dependant.cookie_params or dependant.websocket_param_name
            or dependant.http_connection_param_name or dependant.response_param_name
            or dependant.background_tasks_param_name or dependant.security_scopes_param_name
            or dependant.own_oauth_scopes or dependant.parent_oauth_scopes):
        return None
    if body_field is not None and isinstance(body_field.field_info, params.Form):
        return None
    dependencies = [_plain(d) for d in dependant.dependencies]
    if any(d is None for d in dependencies):
        return None
    return _Plan(dependant, tuple(d for d in dependencies if d is not None),
                 json_body=body_field is not None, embed_body_fields=embed_body_fields,
                 overrides=overrides, query_defaults=_query_defaults(dependant))


def _query_defaults(dependant: Dependant) -> dict[str, Any] | None:
    defaults = {}
    for field in dependant.query_params:
        info = field.field_info
        if (info.is_required() or info.validate_default or _get_param_model(field) is not None
                or not isinstance(field.default, _CONSTANTS)):
            return None
        defaults[field.name] = field.default
    return defaults


_CONSTANTS = (type(None), bool, int, float, str)


def _plain(dependant: Dependant) -> _Call | None:
    """A dependency that is a coroutine function of the request and other such dependencies
    only; None for any other."""
    call = dependant.call
    if (call is None or not inspect.iscoroutinefunction(call) or dependant.path_params
            or dependant.query_params or dependant.header_params or dependant.cookie_params
            or dependant.body_params or dependant.websocket_param_name
            or dependant.http_connection_param_name or dependant.response_param_name
            or dependant.background_tasks_param_name or dependant.security_scopes_param_name
            or dependant.own_oauth_scopes or dependant.parent_oauth_scopes
            or dependant.concurrency is not None):
        return None
    subs = [_plain(d) for d in dependant.dependencies]
    if any(s is None for s in subs):
        return None
    return _Call(dependant, tuple(s for s in subs if s is not None))


def _returns_response(endpoint: Callable[..., Any]) -> bool:
    try:
        annotation = inspect.signature(endpoint, eval_str=True).return_annotation
    except Exception:  # a name the annotation uses is not to be found: not planned
        return False
    return isinstance(annotation, type) and issubclass(annotation, Response)
