"""api/direct.py: a DirectRoute answers every request exactly as FastAPI's own handler does
(the same status, body and headers), and keeps FastAPI's handler where its plan cannot serve.

Each request goes to two copies of one app, one whose routes are plain `APIRoute`s and one
whose routes are `DirectRoute`s, in process over ASGI (a pure routing check: no servers)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

import httpx
import pytest
from fastapi import APIRouter, Body, Depends, FastAPI, Header, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException
from starlette.responses import Response

from conveyor.api import direct
from conveyor.api.direct import DirectRoute

CALLS: list[str] = []


class Item(BaseModel):
    name: Annotated[str, Field(min_length=1)]
    size: int = 1


async def who(request: Request) -> str:
    CALLS.append("who")
    token = request.headers.get("authorization")
    if token == "none":
        raise HTTPException(401, "no key")
    return token or "anonymous"


async def allowed(caller: Annotated[str, Depends(who)]) -> str:
    CALLS.append("allowed")
    if caller == "reader":
        raise HTTPException(403, "reader may not write")
    return caller


async def counted(request: Request) -> int:
    CALLS.append("counted")
    return len(CALLS)


async def shares(a: Annotated[int, Depends(counted, use_cache=False)]) -> int:
    CALLS.append("shares")
    return a


class Page(BaseModel):
    size: int = 5


async def strict_query(request: Request) -> None:
    CALLS.append("strict_query")
    if "bogus" in request.query_params:
        raise RequestValidationError([{"type": "extra_forbidden", "loc": ("query", "bogus"),
                                       "msg": "unknown", "input": "x"}])


def build(route_class: type[APIRoute]) -> FastAPI:
    router = APIRouter(prefix="/items", route_class=route_class)

    @router.post("", status_code=202)
    async def create(item: Annotated[Item, Body()], caller: Annotated[str, Depends(allowed)],
                     wait: Annotated[float | None, Query(gt=0, le=5)] = None,
                     limit: int = 10) -> Response:
        return JSONResponse({"item": item.model_dump(), "caller": caller, "wait": wait,
                             "limit": limit}, status_code=202)

    @router.get("/{item_id}")
    async def read(item_id: uuid.UUID, caller: Annotated[str, Depends(who)],
                   full: bool = False) -> Response:
        return JSONResponse({"id": str(item_id), "caller": caller, "full": full})

    @router.get("/{item_id}/cached")
    async def cached(item_id: uuid.UUID, one: Annotated[int, Depends(shares)],
                     two: Annotated[int, Depends(shares)],
                     fresh: Annotated[int, Depends(counted, scope="function")],
                     again: Annotated[int, Depends(counted)],
                     page: Annotated[Page | None, Query()] = None) -> Response:
        return JSONResponse({"values": [one, two, fresh, again],
                             "page": page.model_dump() if page else None})

    @router.get("/{item_id}/header")
    async def header(item_id: uuid.UUID, x_thing: Annotated[str, Header()]) -> Response:
        return JSONResponse({"id": str(item_id), "thing": x_thing})

    @router.get("/{item_id}/plain")
    async def plain(item_id: uuid.UUID) -> dict[str, Any]:
        return {"id": str(item_id)}

    app = FastAPI()
    app.state.items = router
    app.include_router(router, dependencies=[Depends(who), Depends(strict_query)])

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return JSONResponse({"errors": jsonable_encoder(exc.errors()), "body": repr(exc.body),
                             "said": str(exc)}, status_code=422)

    return app




@pytest.fixture
async def clients() -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient]]:
    async with (httpx.AsyncClient(transport=httpx.ASGITransport(build(APIRoute)),
                                  base_url="http://t") as general,
                httpx.AsyncClient(transport=httpx.ASGITransport(build(DirectRoute)),
                                  base_url="http://t") as fast):
        yield general, fast


ID = "0190a0a0-0000-7000-8000-000000000001"
REQUESTS: list[tuple[str, str, dict[str, Any]]] = [
    ("POST", "/items", {"json": {"name": "a"}}),
    ("POST", "/items?wait=2&limit=3", {"json": {"name": "a", "size": 4}}),
    ("POST", "/items?wait=0", {"json": {"name": ""}}),  # query and body errors at once
    ("POST", "/items?wait=x&limit=y", {"json": {"name": "a"}}),
    ("POST", "/items", {"content": b"{not json", "headers": {"content-type": "application/json"}}),
    ("POST", "/items", {"content": b'{"name": "a"}',
                        "headers": {"content-type": "application/vnd.x+json; charset=utf-8"}}),
    ("POST", "/items", {"content": b'{"name": "a"}', "headers": {"content-type": "text/plain"}}),
    ("POST", "/items", {"content": b'{"name": "a"}',
                        "headers": {"content-type": "application/a/+json"}}),
    ("POST", "/items", {"content": b'{"name": "a"}',
                        "headers": {"content-type": "Application/JSON ; charset=utf-8"}}),
    ("POST", "/items", {"content": b'{"name": "a"}'}),  # no content type: bytes, not JSON
    ("POST", "/items", {}),  # no body
    ("POST", "/items", {"json": [1, 2]}),
    ("POST", "/items", {"json": {"name": "a"}, "headers": {"authorization": "none"}}),
    ("POST", "/items", {"json": {"name": "a"}, "headers": {"authorization": "reader"}}),
    ("POST", "/items?bogus=1", {"json": {"name": "a"}}),
    ("POST", "/items?bogus=1", {"content": b"{", "headers": {"authorization": "none",
                                                             "content-type": "application/json"}}),
    ("GET", f"/items/{ID}", {}),
    ("GET", f"/items/{ID}?full=true", {}),
    ("GET", "/items/not-a-uuid?full=maybe", {}),
    ("GET", f"/items/{ID}/cached", {}),
    ("GET", f"/items/{ID}/cached?size=7", {}),
    ("GET", f"/items/{ID}/cached?size=x", {}),
    ("GET", f"/items/{ID}/header", {"headers": {"x-thing": "t"}}),
    ("GET", f"/items/{ID}/header", {}),
    ("GET", f"/items/{ID}/plain", {}),
]


@pytest.mark.parametrize(("method", "url", "kwargs"), REQUESTS,
                         ids=[f"{m} {u} {sorted(k)}" for m, u, k in REQUESTS])
async def test_a_direct_route_answers_as_fastapi_does(
    clients: tuple[httpx.AsyncClient, httpx.AsyncClient], method: str, url: str,
    kwargs: dict[str, Any],
) -> None:
    general, fast = clients
    CALLS.clear()
    expected = await general.request(method, url, **kwargs)
    calls = list(CALLS)
    CALLS.clear()
    answer = await fast.request(method, url, **kwargs)
    assert (answer.status_code, answer.json(), answer.headers) == (
        expected.status_code, expected.json(), expected.headers)
    assert calls == CALLS  # the same dependencies, in the same order, each once


def test_only_plain_routes_get_a_plan() -> None:
    app = build(DirectRoute)
    planned = {}
    for route in app.state.items.routes:
        if isinstance(route, APIRoute):
            planned[route.path] = direct._plan(
                route.dependant, route.body_field, route._embed_body_fields, None) is not None
    assert planned == {"/items": True, "/items/{item_id}": True, "/items/{item_id}/cached": True,
                       "/items/{item_id}/header": False, "/items/{item_id}/plain": False}


async def test_a_route_reading_a_body_without_a_content_type_as_json_keeps_fastapis_handler(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    answers = []
    for route_class in (APIRoute, DirectRoute):
        app = FastAPI()
        router = APIRouter(route_class=route_class, strict_content_type=False)

        @router.post("/lenient")
        async def lenient(item: Annotated[Item, Body()]) -> Response:
            return JSONResponse(item.model_dump())

        app.include_router(router)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app),
                                     base_url="http://t") as client:
            answer = await client.post("/lenient", content=b'{"name": "a"}')
        answers.append((answer.status_code, answer.json()))
    assert answers[0] == answers[1] == (200, {"name": "a", "size": 1})


async def test_dependency_overrides_are_honoured(
    clients: tuple[httpx.AsyncClient, httpx.AsyncClient],
) -> None:
    _, fast = clients
    app = fast._transport.app  # type: ignore[attr-defined]

    async def someone(request: Request) -> str:
        return "overridden"

    app.dependency_overrides[who] = someone
    answer = await fast.get(f"/items/{ID}")
    assert answer.json()["caller"] == "overridden"
