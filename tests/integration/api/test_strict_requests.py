"""Mistakes that used to pass in silence now get a problem+json naming them: unknown query
parameters, an idempotency key reused with another payload, a body that is not JSON; and
listings no longer carry every payload and result."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from conveyor.api.app import create_app
from conveyor.state import AppState

PROBLEM = "application/problem+json"


@pytest.fixture
async def http(state: AppState) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(state))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client


async def rows(state: AppState) -> int:
    count: int = await state.pool.fetchval(f"SELECT count(*) FROM {state.store.table}")
    return count


async def test_unknown_query_parameters_are_422_naming_them(http: httpx.AsyncClient) -> None:
    task = (await http.post("/v1/tasks", json={"type": "echo", "payload": {}})).json()
    for url in ("/v1/tasks?customer_id=5&type=echo&colour=red",
                f"/v1/tasks/{task['id']}?customer_id=5",
                "/v1/queues?customer_id=5",
                "/v1/queues/echo/dead-letters?customer_id=5&limit=3"):
        response = await http.get(url)
        assert response.status_code == 422, url
        assert response.headers["content-type"] == PROBLEM
        problem = response.json()
        assert problem["errors"][0]["path"] == "query.customer_id", url
        assert "customer_id" in problem["detail"]
    listing = (await http.get("/v1/tasks?customer_id=5&type=echo&colour=red")).json()
    assert [e["path"] for e in listing["errors"]] == ["query.customer_id", "query.colour"]
    assert "cursor, fields, limit, status, type" in listing["detail"]  # what it does take
    ok = await http.get("/v1/tasks?type=echo&limit=3&fields=full")
    assert ok.status_code == 200
    assert (await http.get("/v1/queues/echo/dead-letters?limit=3")).status_code == 200


async def test_a_key_reused_with_another_payload_is_409(
    http: httpx.AsyncClient, state: AppState
) -> None:
    body = {"type": "echo", "payload": {"value": {"a": 1, "b": [1, 2]}},
            "idempotency_key": "order-7"}
    first = await http.post("/v1/tasks", json=body)
    assert first.status_code == 202
    # The same payload as JSON, written differently (key order, spacing): the same request.
    same = await http.post("/v1/tasks", headers={"content-type": "application/json"}, content=(
        b'{ "idempotency_key" : "order-7", "type": "echo",'
        b'  "payload": {"value": {"b": [1,2], "a": 1}} }'))
    assert same.status_code == 200
    assert same.json()["id"] == first.json()["id"]
    other = await http.post("/v1/tasks", json={**body, "payload": {"value": 2}})
    assert other.status_code == 409
    assert other.headers["content-type"] == PROBLEM
    problem = other.json()
    assert "order-7" in problem["detail"]
    assert first.json()["id"] in problem["detail"]
    assert problem["conflicts"] == [{"index": 0, "type": "echo", "idempotency_key": "order-7",
                                     "task_id": first.json()["id"], "first_index": None}]
    assert await rows(state) == 1


async def test_a_batch_with_a_reused_key_creates_nothing(
    http: httpx.AsyncClient, state: AppState
) -> None:
    await http.post("/v1/tasks", json={"type": "echo", "payload": {"value": 1},
                                       "idempotency_key": "k1"})
    fresh = [{"type": "echo", "payload": {"value": i}} for i in range(3)]
    against_earlier = await http.post("/v1/tasks/batch", json={"tasks": [
        *fresh, {"type": "echo", "payload": {"value": 2}, "idempotency_key": "k1"}]})
    assert against_earlier.status_code == 409
    assert against_earlier.json()["conflicts"][0]["index"] == 3
    within = await http.post("/v1/tasks/batch", json={"tasks": [
        {"type": "echo", "payload": {"value": 1}, "idempotency_key": "k2"},
        *fresh,
        {"type": "echo", "payload": {"value": 9}, "idempotency_key": "k2"}]})
    assert within.status_code == 409
    assert within.json()["conflicts"][0] == {"index": 4, "type": "echo",
                                             "idempotency_key": "k2", "task_id": None,
                                             "first_index": 0}
    assert await rows(state) == 1
    repeat = await http.post("/v1/tasks/batch", json={"tasks": [
        *fresh, {"type": "echo", "payload": {"value": 1}, "idempotency_key": "k1"}]})
    assert repeat.status_code == 202
    assert repeat.json()["created"] == 3


async def test_a_body_that_is_not_json_is_415(http: httpx.AsyncClient, state: AppState) -> None:
    for path in ("/v1/tasks", "/v1/tasks/batch"):
        for content_type in ("text/plain", "application/x-www-form-urlencoded"):
            response = await http.post(path, content=b'{"type": "echo", "payload": {}}',
                                       headers={"content-type": content_type})
            assert response.status_code == 415, (path, content_type)
            assert response.headers["content-type"] == PROBLEM
            assert content_type in response.json()["detail"]
    assert await rows(state) == 0
    charset = await http.post("/v1/tasks", content=b'{"type": "echo", "payload": {}}',
                              headers={"content-type": "application/json; charset=utf-8"})
    assert charset.status_code == 202


async def test_listings_are_summaries_unless_full_is_asked_for(
    http: httpx.AsyncClient, state: AppState
) -> None:
    created = (await http.post("/v1/tasks", json={"type": "echo",
                                                  "payload": {"value": "x" * 1000}})).json()
    summary: dict[str, Any] = (await http.get("/v1/tasks")).json()["tasks"][0]
    assert summary["id"] == created["id"]
    assert "payload" not in summary
    assert "result" not in summary
    assert {k: v for k, v in created.items()
            if k not in ("payload", "result", "attempt_history", "dependents")} == summary
    full = (await http.get("/v1/tasks", params={"fields": "full"})).json()["tasks"][0]
    assert full == created
    bad = await http.get("/v1/tasks", params={"fields": "everything"})
    assert bad.status_code == 422
    assert bad.json()["errors"][0]["path"] == "query.fields"
