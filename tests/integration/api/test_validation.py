"""What the API accepts is what its OpenAPI document says: payloads validated strictly (unless
a type opts out), no string PostgreSQL cannot store, every status documented, 405s that name
every method of the path."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import httpx
import pytest
from pydantic import BaseModel, ConfigDict

from conveyor.api.app import create_app
from conveyor.application import Conveyor
from conveyor.errors import PayloadInvalid
from conveyor.registry import TaskContext
from conveyor.state import AppState

PROBLEM = "application/problem+json"


class Order(BaseModel):
    model_config = ConfigDict(extra="forbid")
    count: int
    express: bool = False
    note: str = ""
    when: datetime | None = None
    items: list[int] = []
    tags: dict[str, str] = {}
    extra: dict[str, Any] = {}


async def handle(payload: Order, ctx: TaskContext) -> None:
    return None


@pytest.fixture
def app() -> Conveyor:
    application = Conveyor()
    application.task("order", payload=Order)(handle)
    application.task("lax-order", payload=Order, strict=False)(handle)
    return application


@pytest.fixture
async def http(state: AppState) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(state))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client


async def rows(state: AppState) -> int:
    count: int = await state.pool.fetchval(f"SELECT count(*) FROM {state.store.table}")
    return count


def paths(response: httpx.Response) -> list[str]:
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == PROBLEM
    return [e["path"] for e in response.json()["errors"]]


async def test_payloads_are_strict_as_their_schema_reads(
    http: httpx.AsyncClient, state: AppState
) -> None:
    async def enqueue(payload: dict[str, Any], **extra: Any) -> httpx.Response:
        return await http.post("/v1/tasks", json={"type": "order", "payload": payload, **extra})

    assert paths(await enqueue({"count": True})) == ["payload.count"]
    assert paths(await enqueue({"count": "5"})) == ["payload.count"]
    assert paths(await enqueue({"count": 5.5})) == ["payload.count"]
    assert paths(await enqueue({"count": 1, "express": "yes"})) == ["payload.express"]
    assert paths(await enqueue({"count": 1, "express": 1})) == ["payload.express"]
    assert paths(await enqueue({"count": 1, "note": 7})) == ["payload.note"]
    assert paths(await enqueue({"count": 1, "items": [1, "2", True]})) == [
        "payload.items.1", "payload.items.2"]
    assert paths(await enqueue({"count": 1}, max_attempts=True)) == ["max_attempts"]
    assert paths(await enqueue({"count": 1}, delay_seconds="5")) == ["delay_seconds"]
    assert await rows(state) == 0
    # JSON's own forms are taken: an ISO date-time, and 5.0 for an integer (JSON Schema's).
    ok = await enqueue({"count": 5.0, "items": [1, 2.0], "when": "2026-12-01T10:00:00Z"},
                       max_attempts=2.0, delay_seconds=0)
    assert ok.status_code == 202, ok.text
    task = ok.json()
    assert task["payload"]["count"] == 5
    assert task["payload"]["items"] == [1, 2]
    assert task["max_attempts"] == 2
    batch = await http.post("/v1/tasks/batch", json={"tasks": [
        {"type": "order", "payload": {"count": 1}},
        {"type": "order", "payload": {"count": "2"}}]})
    assert paths(batch) == ["tasks.1.payload.count"]


async def test_a_type_registered_lax_coerces(http: httpx.AsyncClient, state: AppState) -> None:
    response = await http.post("/v1/tasks", json={"type": "lax-order", "payload": {
        "count": "5", "express": "yes", "items": ["1", 2.0]}})
    assert response.status_code == 202, response.text
    assert response.json()["payload"]["count"] == 5
    assert response.json()["payload"]["express"] is True
    assert response.json()["payload"]["items"] == [1, 2]
    # The request around the payload stays strict.
    late = await http.post("/v1/tasks", json={"type": "lax-order", "payload": {"count": 1},
                                              "max_attempts": "3"})
    assert paths(late) == ["max_attempts"]


async def test_mappings_from_python_are_held_to_the_same_rules(state: AppState) -> None:
    with pytest.raises(PayloadInvalid, match="count"):
        await state.client.enqueue("order", {"count": "5"})
    with pytest.raises(PayloadInvalid, match="NUL"):
        await state.client.enqueue("order", {"count": 1, "tags": {"a": "b\x00"}})
    with pytest.raises(PayloadInvalid, match="NUL"):
        await state.client.enqueue("order", Order(count=1, note="nul \x00 here"))
    with pytest.raises(PayloadInvalid, match="surrogate"):
        await state.client.enqueue("order", Order(count=1, note="\ud800"))
    with pytest.raises(PayloadInvalid, match="NUL"):
        await state.client.enqueue("order", {"count": 1}, idempotency_key="k\x00")
    assert await rows(state) == 0
    lax = await state.client.enqueue("lax-order", {"count": "5"})
    assert lax.record.payload == {**Order(count=5).model_dump(mode="json")}
    # A backslash and "u0000" spelt out as text is no NUL.
    text = await state.client.enqueue("order", {"count": 1, "note": "\\u0000"})
    assert text.record.payload["note"] == "\\u0000"


async def test_what_postgres_cannot_store_is_422_naming_the_field(
    http: httpx.AsyncClient, state: AppState
) -> None:
    listing = await http.get("/v1/tasks", params={"type": "order\x00"})
    assert paths(listing) == ["query.type"]
    assert "NUL" in listing.json()["detail"]
    key = await http.post("/v1/tasks", json={"type": "order", "payload": {"count": 1},
                                             "idempotency_key": "k\x00"})
    assert paths(key) == ["idempotency_key"]
    nested = await http.post("/v1/tasks", json={"type": "order", "payload": {
        "count": 1, "tags": {"a": "x\x00"}, "extra": {"deep": [{"k\x00": 1}]}}})
    assert paths(nested) == ["payload.tags.a", "payload.extra.deep.0.k\x00"]
    headers = {"content-type": "application/json"}
    surrogate = await http.post("/v1/tasks", headers=headers, content=(
        b'{"type": "order", "payload": {"count": 1, "note": "\\ud800"}}'))
    assert paths(surrogate) == ["payload.note"]
    assert "surrogate" in surrogate.json()["detail"]
    not_a_number = await http.post("/v1/tasks", headers=headers, content=(
        b'{"type": "order", "payload": {"count": 1, "extra": {"x": NaN}}}'))
    assert paths(not_a_number) == ["payload.extra.x"]
    in_batch = await http.post("/v1/tasks/batch", json={"tasks": [
        {"type": "order", "payload": {"count": 1}},
        {"type": "order", "payload": {"count": 1, "note": "\x00"}}]})
    assert paths(in_batch) == ["tasks.1.payload.note"]
    assert await rows(state) == 0
    # A paired surrogate (an emoji, escaped) is fine.
    emoji = await http.post("/v1/tasks", headers=headers, content=(
        b'{"type": "order", "payload": {"count": 1, "note": "\\ud83d\\ude00"}}'))
    assert emoji.status_code == 202, emoji.text
    assert emoji.json()["payload"]["note"] == "\U0001f600"


async def test_405_names_every_method_of_the_path(http: httpx.AsyncClient) -> None:
    task = (await http.post("/v1/tasks", json={"type": "order", "payload": {"count": 1}})).json()
    cases = [("GET", "/v1/tasks/batch", "POST"), ("OPTIONS", "/v1/tasks", "GET, POST"),
             ("DELETE", "/v1/tasks", "GET, POST"), ("PUT", f"/v1/tasks/{task['id']}", "GET"),
             ("DELETE", "/v1/tasks/not-an-id", "GET"),
             ("GET", f"/v1/tasks/{task['id']}/cancel", "POST"),
             ("POST", "/v1/queues/order/dead-letters", "GET")]
    for method, path, allow in cases:
        response = await http.request(method, path)
        assert response.status_code == 405, (method, path, response.text)
        assert response.headers["allow"] == allow, (method, path)
        assert response.headers["content-type"] == PROBLEM
        assert allow in response.json()["detail"]
    # What the document does not list passes on: an unknown path is still a 404.
    assert (await http.get("/v1/nothing")).status_code == 404


async def test_every_status_is_documented(http: httpx.AsyncClient) -> None:
    document = (await http.get("/openapi.json")).json()
    operations = document["paths"]
    for path, method, codes in [
        ("/v1/tasks", "post", {"200", "202", "400", "409", "413", "415", "422", "500", "503"}),
        ("/v1/tasks/batch", "post", {"202", "400", "409", "413", "415", "422", "500", "503"}),
        ("/v1/tasks/{task_id}", "get", {"200", "404", "422", "500", "503"}),
        ("/v1/tasks/{task_id}/cancel", "post", {"200", "404", "409", "422", "500", "503"}),
        ("/v1/tasks/{task_id}/retry", "post", {"200", "404", "409", "422", "500", "503"}),
    ]:
        assert codes <= set(operations[path][method]["responses"]), (path, method)
    dead_letters = operations["/v1/queues/{task_type}/dead-letters"]["get"]["parameters"]
    task_type = next(p for p in dead_letters if p["name"] == "task_type")
    assert task_type["schema"]["enum"] == ["order", "lax-order"]
    assert paths(await http.get("/v1/queues/nope/dead-letters")) == ["path.task_type"]
    schemas = document["components"]["schemas"]
    order = schemas["Order"]["properties"]
    assert order["note"]["pattern"] == "^[^\\u0000]*$"
    assert order["tags"]["propertyNames"]["pattern"] == "^[^\\u0000]*$"
    assert order["extra"]["additionalProperties"] == {"$ref": "#/components/schemas/StorableJson"}
    assert "pattern" not in order["when"]["anyOf"][0]  # a date-time holds no NUL anyway
    assert "pattern" not in str(schemas["TaskRecord"])  # answers are not request bodies


async def _problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    body: dict[str, Any] = response.json()
    return body


@pytest.mark.parametrize(("body", "path", "says"), [
    ({"type": "nope", "payload": {}}, "type",
     "no task type named 'nope'; registered types: lax-order, order"),
    ({"payload": {}}, "type", "Field required (the task type)"),
    ({"type": "order", "payload": {"count": 1}, "priority": "high"}, "priority",
     "this task type has no priorities"),
])
async def test_errors_name_the_field_in_the_apis_words(
    http: httpx.AsyncClient, body: dict[str, Any], path: str, says: str,
) -> None:
    problem = await _problem(await http.post("/v1/tasks", json=body), 422)
    assert [e["path"] for e in problem["errors"]] == [path]
    assert problem["errors"][0]["message"].startswith(says)
    assert says in problem["detail"]
    batch = await http.post("/v1/tasks/batch", json={"tasks": [body]})
    assert [e["path"] for e in (await _problem(batch, 422))["errors"]] == [f"tasks.0.{path}"]


async def test_malformed_json_says_why_and_where(http: httpx.AsyncClient) -> None:
    response = await http.post("/v1/tasks", content=b'{"type": "order",',
                               headers={"content-type": "application/json"})
    problem = await _problem(response, 400)
    assert problem["errors"][0]["path"] == "(body)"
    assert problem["detail"].startswith("the request body is not valid JSON: ")
    assert "at character 17" in problem["detail"]


async def test_a_bad_rate_says_what_a_rate_is(http: httpx.AsyncClient) -> None:
    response = await http.patch("/v1/queues/order/limits", json={"rate_limit": "fast"})
    problem = await _problem(response, 422)
    assert problem["errors"][0]["path"] == "rate_limit"
    assert problem["errors"][0]["message"].startswith("not a rate: write N/s, N/m or N/h")
