"""Limits changed through the API: a change that cannot apply is refused whole (422 naming the
field, nothing stored), and a bad row written by hand stops neither a worker nor a page."""

from __future__ import annotations

import asyncio
import dataclasses

import httpx
import pytest

from conveyor import metrics
from conveyor.api.app import create_app
from conveyor.client import TaskRequest
from conveyor.state import AppState
from conveyor.store.keys import KeyStore
from tests.conftest import eventually
from tests.integration.flow.conftest import StartWorker, finished


async def _row(state: AppState, task_type: str) -> object:
    return await state.pool.fetchrow(
        f"SELECT * FROM {state.settings.database_schema}.queue_settings WHERE type = $1",
        task_type)


@pytest.mark.parametrize(("field", "value"), [("max_concurrency_per_key", 5),
                                          ("rate_limit_per_key", "5/s")])
async def test_a_per_key_limit_on_a_keyless_type_is_refused_and_not_stored(
    state: AppState, api: httpx.AsyncClient, start_worker: StartWorker, field: str,
    value: object,
) -> None:
    refused = await api.patch("/v1/queues/plain/limits", json={field: value})
    assert refused.status_code == 422, refused.text
    problem = refused.json()
    assert problem["errors"][0]["path"] == field
    assert "concurrency_key" in problem["detail"]
    assert await _row(state, "plain") is None  # rolled back
    assert (await api.get("/v1/queues")).status_code == 200
    # Lifting it (0 / off) on a keyless type is harmless, and allowed.
    lifted = await api.patch("/v1/queues/plain/limits",
                             json={field: 0 if isinstance(value, int) else "off"})
    assert lifted.status_code == 200, lifted.text
    await start_worker(types=["plain"])
    inserted = await state.client.enqueue_many([TaskRequest("plain", {}) for _ in range(5)])
    await eventually(lambda: finished(state, [i.record.id for i in inserted]), 20)


async def test_a_bad_stored_row_falls_back_to_the_declared_limits(
    state: AppState, api: httpx.AsyncClient, start_worker: StartWorker
) -> None:
    await state.pool.execute(
        f"INSERT INTO {state.settings.database_schema}.queue_settings"
        " (type, max_concurrency_per_key, rate_limit) VALUES ('plain', 5, 'lots'),"
        " ('limited', NULL, 'fast')")
    listed = await api.get("/v1/queues")
    assert listed.status_code == 200, listed.text
    flows = {q["type"]: q["flow"] for q in listed.json()["queues"]}
    assert flows["plain"]["max_concurrency_per_key"] is None
    assert flows["plain"]["rate_limit"] is None
    assert flows["limited"]["max_concurrency"] == 3  # as declared
    worker = await start_worker(types=["plain", "limited"])
    inserted = await state.client.enqueue_many(
        [TaskRequest(t, {}) for t in ("plain", "limited") for _ in range(5)])
    await eventually(lambda: finished(state, [i.record.id for i in inserted]), 20)
    await worker.gate.reload()  # a reload meets the row again: declared limits, no failure
    assert worker.gate.of("limited").max_concurrency == 3
    inserted = await state.client.enqueue_many([TaskRequest("plain", {}) for _ in range(3)])
    await eventually(lambda: finished(state, [i.record.id for i in inserted]), 20)


def _waiting(task_type: str) -> float:
    return float(metrics.TASKS_WAITING_ON_LIMIT.labels(task_type)._value.get())


async def test_the_waiting_gauge_counts_a_paused_backlog_and_clears_once_lifted(
    state: AppState, api: httpx.AsyncClient, start_worker: StartWorker
) -> None:
    paused = await api.post("/v1/queues/plain/pause")
    assert paused.status_code == 200
    assert paused.json()["paused"] is True
    assert paused.json()["leases_in_use"] == 0  # as GET /v1/queues counts them
    await start_worker(types=["plain"])
    inserted = await state.client.enqueue_many([TaskRequest("plain", {}) for _ in range(10)])

    async def shown(n: float) -> bool:
        return _waiting("plain") == n

    await eventually(lambda: shown(10), 10)  # read at most once a second while held back
    assert (await api.post("/v1/queues/plain/resume")).status_code == 200
    await eventually(lambda: finished(state, [i.record.id for i in inserted]), 20)
    await eventually(lambda: shown(0), 5)  # no limit left: the gauge does not keep its 10


async def test_a_message_a_blocking_read_returns_after_the_pause_is_not_started(
    state: AppState, api: httpx.AsyncClient, start_worker: StartWorker
) -> None:
    # One unlimited type: its consumer blocks in XREADGROUP (here up to 5 s), begun before
    # the pause; what that read returns afterwards waits for the resume.
    slow = dataclasses.replace(state, settings=state.settings.model_copy(update={
        "read_block": 5.0}))
    worker = await start_worker(types=["plain"], state=slow)
    await eventually(lambda: _beating(state), 10)
    await asyncio.sleep(0.3)  # the read is blocking
    assert (await api.post("/v1/queues/plain/pause")).status_code == 200

    async def paused() -> bool:
        return worker.gate.of("plain").paused

    await eventually(paused, 5)
    task = (await state.client.enqueue("plain", {})).record
    await asyncio.sleep(1.5)
    stored = await state.store.get(task.id)
    assert stored is not None
    assert stored.status == "queued"  # handed back to the stream, not started
    assert (await api.post("/v1/queues/plain/resume")).status_code == 200
    await eventually(lambda: finished(state, [task.id]), 15)


async def _beating(state: AppState) -> bool:
    return len(await state.workers.live(60)) == 1


async def test_limits_need_admin_and_pause_resume_need_tasks_manage(state: AppState) -> None:
    keys = KeyStore(state.pool, state.settings.database_schema)
    # (The queues routes all read: a manage key carries tasks:read too, as keys do.)
    scopes = {"tasks:read": ["tasks:read"], "tasks:manage": ["tasks:read", "tasks:manage"],
              "admin": ["admin"]}
    by_scope = {name: (await keys.create(f"k-{name.replace(':', '-')}", given))[1]
                for name, given in scopes.items()}
    transport = httpx.ASGITransport(app=create_app(state))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        async def status(method: str, path: str, scope: str, **kw: object) -> int:
            reply = await http.request(method, path, headers={
                "Authorization": f"Bearer {by_scope[scope]}"}, **kw)  # type: ignore[arg-type]
            return reply.status_code

        limits = "/v1/queues/plain/limits"
        assert await status("PATCH", limits, "tasks:read", json={"max_concurrency": 2}) == 403
        assert await status("PATCH", limits, "tasks:manage", json={"max_concurrency": 2}) == 403
        assert await status("PATCH", limits, "admin", json={"max_concurrency": 2}) == 200
        for action in ("pause", "resume"):
            path = f"/v1/queues/plain/{action}"
            assert await status("POST", path, "tasks:read") == 403
            assert await status("POST", path, "tasks:manage") == 200
            assert await status("POST", path, "admin") == 200
