"""GET /v1/workers against real Postgres and Redis: live counts while tasks run, and a worker
stopped cleanly is gone at once, not after its TTL."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from conveyor.api.app import create_app
from conveyor.runtime.shutdown import Shutdown
from conveyor.state import AppState
from conveyor.worker.worker import Worker
from tests.apps import basic
from tests.conftest import eventually


@pytest.fixture
async def http(state: AppState) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(state))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client


async def listed(http: httpx.AsyncClient) -> list[dict[str, Any]]:
    response = await http.get("/v1/workers")
    assert response.status_code == 200
    workers: list[dict[str, Any]] = response.json()["workers"]
    return workers


async def test_in_flight_is_live_and_a_clean_stop_unlists_the_worker(
    state: AppState, http: httpx.AsyncClient
) -> None:
    slow = state.settings.model_copy(update={"heartbeat_interval": 60.0, "heartbeat_ttl": 180.0})
    worker = Worker(dataclasses.replace(state, settings=slow), types=["sleep"])
    stop = Shutdown(10)
    running = asyncio.create_task(worker.run(stop))
    await eventually(lambda: _listed(http, worker.worker_id))
    (before,) = await listed(http)
    assert before["in_flight"] == 0
    for _ in range(3):
        await state.client.enqueue("sleep", {"seconds": 1.0})
    await eventually(lambda: _running(3))

    async def three_in_flight() -> bool:  # long before the next beat (60 s)
        (row,) = await listed(http)
        return bool(row["in_flight"] == 3)

    await eventually(three_in_flight, timeout_s=5)
    stop.begin("test")
    await asyncio.wait_for(running, 15)
    assert await listed(http) == []  # gone at once: its TTL is three minutes


async def _listed(http: httpx.AsyncClient, worker_id: str) -> bool:
    return [w["id"] for w in await listed(http)] == [worker_id]


async def _running(n: int) -> bool:
    return basic.probe.running >= n
