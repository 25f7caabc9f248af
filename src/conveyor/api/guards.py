"""Router dependencies that make silent mistakes loud: a query parameter the route does not
take (422 naming it, rather than a listing that looks filtered and is not), and a request body
that is not JSON (415, rather than a 422 about the body's shape)."""

from __future__ import annotations

from fastapi import Request
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

JSON_MEDIA_TYPES = "application/json (or any application/*+json)"


def _query_names(dependant: Dependant) -> set[str]:
    names = {param.alias for param in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names


# Routes are not hashable: keyed by id (an entry holds its route, so the id stays its own).
_ACCEPTED: dict[int, tuple[APIRoute, frozenset[str]]] = {}


def _accepted(route: APIRoute) -> frozenset[str]:
    cached = _ACCEPTED.get(id(route))
    if cached is None:
        if len(_ACCEPTED) > 4096:  # apps built and dropped again and again (tests)
            _ACCEPTED.clear()
        cached = _ACCEPTED[id(route)] = (route, frozenset(_query_names(route.dependant)))
    return cached[1]


async def reject_unknown_query(request: Request) -> None:
    """422 naming every query parameter the matched route does not declare."""
    if not request.query_params:
        return
    route = request.scope.get("route")
    if not isinstance(route, APIRoute):
        return
    accepted = _accepted(route)
    unknown = [name for name in request.query_params if name not in accepted]
    if not unknown:
        return
    takes = ", ".join(sorted(accepted)) or "none"
    raise RequestValidationError([
        {
            "type": "extra_forbidden",
            "loc": ("query", name),
            "msg": f"unknown query parameter (this route takes: {takes})",
            "input": request.query_params.get(name),
        }
        for name in unknown
    ])


async def require_json(request: Request) -> None:
    """415 for a body sent with a content type other than JSON. (A request without any
    content type is read as JSON, as FastAPI does.)"""
    content_type = request.headers.get("content-type")
    if content_type is None:
        return
    media = content_type.partition(";")[0].strip().lower()
    if media == "application/json" or (media.startswith("application/")
                                       and media.endswith("+json")):
        return
    raise HTTPException(
        415, f"the body must be {JSON_MEDIA_TYPES}, not {media or 'an empty content type'}"
    )
