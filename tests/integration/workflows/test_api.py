"""The /v1/workflows routes and `depends_on` on /v1/tasks, over ASGI, with a worker and relay."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from conveyor.api.app import create_app
from conveyor.http import AsyncClient, InvalidRequest, NodeSpec
from conveyor.state import AppState
from tests.conftest import eventually

PROBLEM = "application/problem+json"


@pytest.fixture
async def http(running: AppState) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(running))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client


def n(key: str, *deps: str, **extra: Any) -> dict[str, Any]:
    return {"key": key, "type": "node", "payload": {"name": key}, "depends_on": list(deps),
            **extra}


async def test_a_workflow_is_created_read_listed_and_finishes(http: httpx.AsyncClient) -> None:
    reply = await http.post("/v1/workflows", json={
        "name": "diamond", "tasks": [n("a"), n("b", "a"), n("c", "a"), n("d", "b", "c")]})
    assert reply.status_code == 201, reply.text
    body = reply.json()
    assert reply.headers["location"] == f"/v1/workflows/{body['id']}"
    keyed = {t["key"]: t for t in body["tasks"]}
    assert keyed["d"]["status"] == "waiting"
    assert keyed["d"]["depends_on"] == [keyed["b"]["id"], keyed["c"]["id"]]
    assert sorted(keyed["a"]["dependents"]) == sorted([keyed["b"]["id"], keyed["c"]["id"]])
    assert keyed["a"]["workflow_id"] == body["id"]
    found: dict[str, Any] = {}

    async def done() -> bool:
        nonlocal found
        found = (await http.get(f"/v1/workflows/{body['id']}")).json()
        return bool(found["status"] == "succeeded")

    await eventually(done, 20)
    task = (await http.get(f"/v1/tasks/{keyed['a']['id']}")).json()
    assert sorted(task["dependents"]) == sorted([keyed["b"]["id"], keyed["c"]["id"]])
    page = (await http.get("/v1/tasks", params={"type": "node", "fields": "full"})).json()
    listed_a = next(t for t in page["tasks"] if t["id"] == keyed["a"]["id"])
    assert sorted(listed_a["dependents"]) == sorted([keyed["b"]["id"], keyed["c"]["id"]])
    listed = (await http.get("/v1/workflows")).json()
    assert [w["id"] for w in listed["workflows"]] == [body["id"]]
    assert listed["workflows"][0]["counts"] == {"succeeded": 4}
    refused = await http.post(f"/v1/workflows/{body['id']}/cancel")
    assert refused.status_code == 409, refused.text
    assert refused.headers["content-type"] == PROBLEM
    assert refused.json()["status_now"] == "succeeded"
    assert (await http.get(f"/v1/workflows/{body['id']}")).json()["status"] == "succeeded"


async def test_bad_graphs_are_422_problems_naming_the_rule(http: httpx.AsyncClient) -> None:
    for tasks, rule in [([n("a", "b"), n("b", "a")], "cycle"),
                        ([n("a", "zz")], "unknown_key"),
                        ([n("a"), n("a")], "duplicate_key")]:
        reply = await http.post("/v1/workflows", json={"tasks": tasks})
        assert reply.status_code == 422, reply.text
        assert reply.headers["content-type"] == PROBLEM
        assert reply.json()["rule"] == rule
    reply = await http.post("/v1/workflows", json={"tasks": [n(f"k{i}") for i in range(1001)]})
    assert reply.status_code == 422
    assert reply.json()["errors"][0]["path"] == "tasks"
    reply = await http.post("/v1/workflows", json={"tasks": [{**n("a"), "nope": 1}]})
    assert reply.status_code == 422
    reply = await http.post("/v1/tasks", json={
        "type": "node", "payload": {"name": "x"},
        "depends_on": ["0190a0a0-0000-7000-8000-000000000000"]})
    assert reply.status_code == 422
    assert reply.json()["rule"] == "unknown_task"
    assert (await http.get("/v1/workflows/0190a0a0-0000-7000-8000-000000000000")).status_code \
        == 404


async def test_depends_on_over_the_api_and_a_cancelled_upstream(http: httpx.AsyncClient) -> None:
    first = (await http.post("/v1/tasks", json={
        "type": "node", "payload": {"name": "up"}, "delay_seconds": 60})).json()
    second = (await http.post("/v1/tasks", json={
        "type": "node", "payload": {"name": "down"}, "depends_on": [first["id"]]})).json()
    assert second["status"] == "waiting"
    assert second["depends_on"] == [first["id"]]
    assert (await http.post(f"/v1/tasks/{first['id']}/cancel")).status_code == 200
    down = (await http.get(f"/v1/tasks/{second['id']}?wait=10")).json()
    assert down["status"] == "cancelled"
    assert down["last_error"] == f"upstream task {first['id']} ended cancelled"


async def test_the_python_http_client_creates_and_retries_a_workflow(running: AppState) -> None:
    transport = httpx.ASGITransport(app=create_app(running))
    async with AsyncClient("http://test", transport=transport) as api:
        created = await api.create_workflow(
            [NodeSpec("a", "node", {"name": "a", "fail_runs": 1}),
             NodeSpec("b", "node", {"name": "b"}, depends_on=["a"])], name="via-http")
        assert created.node("b").status == "waiting"
        found = created

        async def status_is(wanted: str) -> bool:
            nonlocal found
            found = await api.get_workflow(created.id)
            return found.status == wanted

        await eventually(lambda: status_is("failed"), 20)
        assert found.node("b").status == "cancelled"
        await api.retry_workflow(created.id)
        await eventually(lambda: status_is("succeeded"), 20)
        assert found.node("b").depends_on == [found.node("a").id]
        with pytest.raises(InvalidRequest):
            await api.create_workflow([NodeSpec("a", "node", {"name": "a"}, depends_on=["a"])])
