"""The /v1/tasks API against real Postgres and Redis (no worker unless a test starts one)."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest

from conveyor.api.app import create_app
from conveyor.state import AppState
from conveyor.worker.worker import Worker
from tests.apps import basic
from tests.conftest import eventually

PROBLEM = "application/problem+json"


@pytest.fixture
async def http(state: AppState) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(state))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client


async def rows(state: AppState) -> int:
    count: int = await state.pool.fetchval(f"SELECT count(*) FROM {state.store.table}")
    return count


async def messages(state: AppState, task_type: str) -> int:
    return int(await state.redis.xlen(state.keys.stream(task_type)))


async def wait_status(http: httpx.AsyncClient, task_id: str, status: str) -> dict[str, Any]:
    body: dict[str, Any] = {}

    async def reached() -> bool:
        nonlocal body
        body = (await http.get(f"/v1/tasks/{task_id}")).json()
        return bool(body["status"] == status)

    await eventually(reached)
    return body


async def test_enqueue_answers_202_with_the_task_and_publishes_it(
    http: httpx.AsyncClient, state: AppState
) -> None:
    response = await http.post("/v1/tasks", json={"type": "echo", "payload": {"value": "hi"}})
    assert response.status_code == 202
    body = response.json()
    assert body["status"] == "queued"
    assert body["payload"] == {"value": "hi"}
    assert body["attempts"] == 0
    assert body["max_attempts"] == state.settings.max_attempts
    assert response.headers["location"] == f"/v1/tasks/{body['id']}"
    assert await rows(state) == 1
    assert await messages(state, "echo") == 1
    fetched = await http.get(f"/v1/tasks/{body['id']}")
    assert fetched.json() == body


async def test_invalid_payload_is_422_naming_the_field_and_leaves_nothing(
    http: httpx.AsyncClient, state: AppState
) -> None:
    response = await http.post("/v1/tasks", json={"type": "flaky", "payload": {"failures": "x"}})
    assert response.status_code == 422
    assert response.headers["content-type"] == PROBLEM
    problem = response.json()
    assert problem["errors"][0]["path"] == "payload.failures"
    assert "payload.failures" in problem["detail"]
    assert problem["request_id"]
    assert await rows(state) == 0
    assert await messages(state, "flaky") == 0


async def test_unknown_type_is_422_listing_known_types(
    http: httpx.AsyncClient, state: AppState
) -> None:
    response = await http.post("/v1/tasks", json={"type": "nope", "payload": {}})
    assert response.status_code == 422
    assert response.headers["content-type"] == PROBLEM
    assert "nope" in response.json()["detail"]
    assert "echo" in response.json()["detail"]
    assert await rows(state) == 0


async def test_malformed_json_is_400(http: httpx.AsyncClient, state: AppState) -> None:
    response = await http.post(
        "/v1/tasks", content=b'{"type": "echo", "payload": ', headers={"content-type":
                                                                         "application/json"}
    )
    assert response.status_code == 400
    assert response.headers["content-type"] == PROBLEM
    assert "JSON" in response.json()["detail"]
    assert await rows(state) == 0


async def test_unexpected_fields_are_rejected(http: httpx.AsyncClient, state: AppState) -> None:
    response = await http.post("/v1/tasks", json={"type": "echo", "payload": {}, "prio": 1})
    assert response.status_code == 422
    assert response.json()["errors"][0]["path"] == "prio"
    assert await rows(state) == 0


async def test_oversized_body_is_413(state: AppState) -> None:
    small = state.settings.model_copy(update={"max_body_bytes": 2048})
    app = create_app(dataclasses.replace(state, settings=small))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        big = {"type": "echo", "payload": {"value": "x" * 5000}}
        response = await http.post("/v1/tasks", json=big)
        assert response.status_code == 413
        assert response.headers["content-type"] == PROBLEM
        assert "2048" in response.json()["detail"]

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it streams
            yield b'{"type": "echo", "payload": {"value": "'
            for _ in range(10):
                yield b"y" * 500
            yield b'"}}'

        streamed = await http.post("/v1/tasks", content=chunks(),
                                   headers={"content-type": "application/json"})
        assert streamed.status_code == 413
    assert await rows(state) == 0
    assert await messages(state, "echo") == 0


async def test_idempotency_key_returns_the_first_task_and_runs_once(
    http: httpx.AsyncClient, state: AppState, start_worker: Callable[..., Awaitable[Worker]]
) -> None:
    body = {"type": "echo", "payload": {"value": 1}, "idempotency_key": "order-7"}
    first = await http.post("/v1/tasks", json=body)
    second = await http.post("/v1/tasks", json=body)
    assert (first.status_code, second.status_code) == (202, 200)
    assert first.json()["id"] == second.json()["id"]
    assert await rows(state) == 1
    await start_worker()
    done = await wait_status(http, first.json()["id"], "succeeded")
    assert done["result"]["echo"] == 1
    third = await http.post("/v1/tasks", json=body)
    assert third.status_code == 200
    assert third.json()["status"] == "succeeded"
    assert basic.probe.runs[first.json()["id"]] == 1
    # The same key under another type is another task.
    other = await http.post("/v1/tasks", json={**body, "type": "refuse"})
    assert other.status_code == 202


async def test_batch_is_one_transaction_and_reports_created(
    http: httpx.AsyncClient, state: AppState
) -> None:
    tasks = [{"type": "echo", "payload": {"value": i}} for i in range(50)]
    tasks.append({"type": "echo", "payload": {"value": "k"}, "idempotency_key": "same"})
    tasks.append({"type": "echo", "payload": {"value": "k"}, "idempotency_key": "same"})
    response = await http.post("/v1/tasks/batch", json={"tasks": tasks})
    assert response.status_code == 202
    body = response.json()
    assert body["created"] == 51
    assert len(body["tasks"]) == 52
    assert body["tasks"][50]["id"] == body["tasks"][51]["id"]
    assert [t["payload"]["value"] for t in body["tasks"][:50]] == list(range(50))
    assert await rows(state) == 51
    assert await messages(state, "echo") == 51


async def test_a_batch_with_one_bad_task_creates_nothing(
    http: httpx.AsyncClient, state: AppState
) -> None:
    tasks: list[dict[str, Any]] = [{"type": "echo", "payload": {}} for _ in range(5)]
    tasks.append({"type": "flaky", "payload": {}})
    response = await http.post("/v1/tasks/batch", json={"tasks": tasks})
    assert response.status_code == 422
    assert response.json()["errors"][0]["path"] == "tasks.5.payload.failures"
    too_many = await http.post("/v1/tasks/batch", json={"tasks": [tasks[0]] * 1001})
    assert too_many.status_code == 422
    assert await rows(state) == 0


async def test_list_pages_newest_first_with_filters(
    http: httpx.AsyncClient, state: AppState
) -> None:
    tasks = [{"type": "echo" if i % 2 else "refuse", "payload": {"value": i}} for i in range(25)]
    await http.post("/v1/tasks/batch", json={"tasks": tasks})
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"type": "echo", "limit": 5}
        if cursor:
            params["cursor"] = cursor
        page = (await http.get("/v1/tasks", params=params)).json()
        seen += [t["id"] for t in page["tasks"]]
        assert all(t["type"] == "echo" for t in page["tasks"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == 12
    assert seen == sorted(seen, reverse=True)
    assert len(set(seen)) == 12
    queued = (await http.get("/v1/tasks", params={"status": "queued", "limit": 100})).json()
    assert len(queued["tasks"]) == 25
    bad = await http.get("/v1/tasks", params={"status": "sleeping"})
    assert bad.status_code == 422


async def test_cancel_and_retry_follow_the_state_machine(
    http: httpx.AsyncClient, state: AppState
) -> None:
    task = (await http.post("/v1/tasks", json={"type": "echo", "payload": {}})).json()
    cancelled = await http.post(f"/v1/tasks/{task['id']}/cancel")
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelled"
    again = await http.post(f"/v1/tasks/{task['id']}/cancel")
    assert again.status_code == 409
    assert again.headers["content-type"] == PROBLEM
    assert "cancelled" in again.json()["detail"]
    retried = await http.post(f"/v1/tasks/{task['id']}/retry")
    assert retried.status_code == 200
    assert retried.json()["status"] == "queued"
    assert (await http.post(f"/v1/tasks/{task['id']}/retry")).status_code == 409
    missing = await http.get(f"/v1/tasks/{uuid.uuid4()}")
    assert missing.status_code == 404
    assert missing.headers["content-type"] == PROBLEM
    assert (await http.get("/v1/tasks/not-a-uuid")).status_code == 422


async def test_cancelled_task_never_runs(
    http: httpx.AsyncClient, state: AppState, start_worker: Callable[..., Awaitable[Worker]]
) -> None:
    doomed = (await http.post("/v1/tasks", json={"type": "echo", "payload": {}})).json()
    await http.post(f"/v1/tasks/{doomed['id']}/cancel")
    control = (await http.post("/v1/tasks", json={"type": "echo", "payload": {}})).json()
    await start_worker()
    await wait_status(http, control["id"], "succeeded")
    assert basic.probe.runs[doomed["id"]] == 0
    assert (await http.get(f"/v1/tasks/{doomed['id']}")).json()["status"] == "cancelled"


async def test_delayed_task_waits_for_its_time(
    http: httpx.AsyncClient, state: AppState, start_worker: Callable[..., Awaitable[Worker]]
) -> None:
    await start_worker()
    task = (await http.post("/v1/tasks", json={"type": "echo", "payload": {},
                                                "delay_seconds": 1.0})).json()
    assert await messages(state, "echo") == 0
    assert await state.redis.zcard(state.keys.delayed("echo")) == 1
    done = await wait_status(http, task["id"], "succeeded")
    started = done["started_at"]
    assert started >= task["run_at"]


async def test_openapi_carries_each_payload_schema(http: httpx.AsyncClient) -> None:
    spec = (await http.get("/openapi.json")).json()
    schemas = spec["components"]["schemas"]
    assert "FlakyTask" in schemas
    assert schemas["Flaky"]["properties"]["failures"]["type"] == "integer"
    body = spec["paths"]["/v1/tasks"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"]["discriminator"]["propertyName"] == "type"
    assert (await http.get("/docs")).status_code == 200


async def test_request_id_is_echoed_or_made(http: httpx.AsyncClient) -> None:
    given = await http.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert given.headers["x-request-id"] == "abc-123"
    made = await http.get("/healthz", headers={"X-Request-ID": "bad id with spaces"})
    assert made.headers["x-request-id"] != "bad id with spaces"
    assert len(made.headers["x-request-id"]) == 32


async def test_api_keys_guard_everything_but_health_and_docs(state: AppState) -> None:
    keyed = state.settings.model_copy(update={"api_keys": ["s3cret", "other"]})
    app = create_app(dataclasses.replace(state, settings=keyed))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        denied = await http.post("/v1/tasks", json={"type": "echo", "payload": {}})
        assert denied.status_code == 401
        assert denied.headers["content-type"] == PROBLEM
        assert denied.headers["www-authenticate"] == "Bearer"
        wrong = await http.get("/v1/tasks", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        ok = await http.post("/v1/tasks", json={"type": "echo", "payload": {}},
                             headers={"Authorization": "Bearer other"})
        assert ok.status_code == 202
        for path in ("/healthz", "/readyz", "/docs", "/docs/assets/swagger-ui.css",
                     "/openapi.json"):
            assert (await http.get(path)).status_code == 200, path
        assert (await http.get("/metrics")).status_code == 401


async def test_readiness_and_metrics(http: httpx.AsyncClient) -> None:
    ready = await http.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"postgres": "ok", "redis": "ok"}
    await http.post("/v1/tasks", json={"type": "echo", "payload": {}})
    text = (await http.get("/metrics")).text
    assert 'conveyor_tasks_enqueued_total{type="echo"}' in text
    assert 'route="/v1/tasks"' in text


async def test_queues_and_workers_report_what_is_going_on(
    http: httpx.AsyncClient, state: AppState, start_worker: Callable[..., Awaitable[Worker]]
) -> None:
    await http.post("/v1/tasks/batch", json={"tasks": [{"type": "refuse", "payload": {}}] * 3})
    queues = {q["type"]: q for q in (await http.get("/v1/queues")).json()["queues"]}
    assert queues["refuse"]["queued"] == 3
    assert queues["refuse"]["stream_length"] == 3
    assert queues["refuse"]["undelivered"] == 3
    assert queues["refuse"]["oldest_queued_age_s"] is not None
    worker = await start_worker()

    async def all_dead() -> bool:
        q = {q["type"]: q for q in (await http.get("/v1/queues")).json()["queues"]}
        return bool(q["refuse"]["dead"] == 3)

    await eventually(all_dead)
    queues = {q["type"]: q for q in (await http.get("/v1/queues")).json()["queues"]}
    assert queues["refuse"]["dead_letters"] == 3
    assert queues["refuse"]["queued"] == 0
    letters = (await http.get("/v1/queues/refuse/dead-letters")).json()["entries"]
    assert len(letters) == 3
    assert "not doing this" in letters[0]["reason"]
    workers = (await http.get("/v1/workers")).json()["workers"]
    assert [w["id"] for w in workers] == [worker.worker_id]
    assert set(workers[0]["types"]) == set(state.app.registry.types)
    assert workers[0]["concurrency"] == state.settings.concurrency


async def test_an_unexpected_error_is_a_500_problem_with_the_request_id(state: AppState) -> None:
    from fastapi import APIRouter

    from conveyor.application import Conveyor

    broken = APIRouter()

    @broken.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret internals")

    conveyor = Conveyor()
    conveyor.registry = state.app.registry
    conveyor.include_router(broken)
    app = create_app(dataclasses.replace(state, app=conveyor))
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        response = await http.get("/boom", headers={"X-Request-ID": "req-42"})
    assert response.status_code == 500
    assert response.headers["content-type"] == PROBLEM
    assert response.headers["x-request-id"] == "req-42"
    assert response.json()["request_id"] == "req-42"
    assert "secret" not in response.text
