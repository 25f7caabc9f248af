"""What a handler returns or raises cannot take a worker down or leave a task stuck."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable

import httpx

from conveyor.api.app import create_app
from conveyor.state import AppState
from conveyor.store.tasks import TaskRecord
from conveyor.worker.worker import Worker
from tests.apps import basic
from tests.conftest import eventually

StartWorker = Callable[..., Awaitable[Worker]]


async def final(state: AppState, task_id: uuid.UUID) -> TaskRecord:
    record: TaskRecord | None = None

    async def finished() -> bool:
        nonlocal record
        record = await state.store.get(task_id)
        return record is not None and record.status in ("succeeded", "dead")

    await eventually(finished, timeout_s=15)
    assert record is not None
    return record


async def test_nul_characters_in_errors_and_results_are_stored_safely(
    state: AppState, start_worker: StartWorker
) -> None:
    raised = (await state.client.enqueue("poison", {"value": "raise"})).record.id
    returned = (await state.client.enqueue("poison", {"value": "return"})).record.id
    worker = await start_worker()
    failed = await final(state, raised)
    assert failed.status == "dead"
    assert failed.attempts == 2
    assert "bad\\0byte" in (failed.last_error or "")
    refused = await final(state, returned)
    assert refused.status == "dead"
    assert "NUL character" in (refused.last_error or "")
    after = (await state.client.enqueue("echo", {})).record.id  # the worker is still serving
    assert (await final(state, after)).status == "succeeded"
    assert worker.processed == 4


async def test_a_handlers_own_cancellation_is_a_failed_attempt(
    state: AppState, start_worker: StartWorker
) -> None:
    task_id = (await state.client.enqueue("poison", {"value": "cancel"})).record.id
    await start_worker()
    record = await final(state, task_id)
    assert record.status == "dead"
    assert record.attempts == 2  # retried, then given up: not left running
    assert "CancelledError" in (record.last_error or "")
    assert basic.probe.runs[str(task_id)] == 2


async def test_nul_in_a_payload_is_422_not_500(state: AppState) -> None:
    transport = httpx.ASGITransport(app=create_app(state))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        response = await http.post("/v1/tasks", json={"type": "echo",
                                                       "payload": {"value": "a\u0000b"}})
        assert response.status_code == 422
        assert "NUL" in response.json()["detail"]
        ok = await http.post("/v1/tasks", json={"type": "echo", "payload": {"value": "ab"}})
        assert ok.status_code == 202
