"""`conveyor` as real processes: SIGKILL recovery, SIGTERM drain, second signal, cron
processes, start-up failure."""

from __future__ import annotations

import asyncio
import signal
import socket
import time
import uuid
from typing import Any

import httpx
import pytest

from conveyor.client import Client
from conveyor.queue.keys import GROUP, consumer_name
from conveyor.state import AppState
from conveyor.testing.servers import free_port
from tests.apps import system
from tests.conftest import eventually
from tests.system.conftest import Spawner, api_ready

pytestmark = pytest.mark.slow
APP = ["--app", "tests.apps.system:app"]


def client_for(state: AppState) -> Client:
    return Client(state.store, state.streams, system.app.registry)


async def status(state: AppState, task_id: uuid.UUID) -> str | None:
    record = await state.store.get(task_id)
    return record.status if record else None


async def runs(state: AppState, task_id: uuid.UUID) -> int:
    value = await state.redis.get(system.runs_key(state.keys.prefix, str(task_id)))
    return int(value or 0)


async def test_a_sigkilled_workers_task_is_completed_by_another(
    state: AppState, spawn: Spawner
) -> None:
    client = client_for(state)
    first = spawn("worker", *APP, "--types", "work")
    task_id = (await client.enqueue("work", {"seconds": 3})).record.id

    async def mid_task() -> bool:  # its handler has begun (it counts its run first thing)
        return await runs(state, task_id) == 1

    await eventually(mid_task, timeout_s=30)
    record = await state.store.get(task_id)
    assert record is not None
    assert record.status == "running"
    assert record.worker
    dead_worker = record.worker
    first.signal(signal.SIGKILL)
    first.wait()

    spawn("cron", *APP)
    spawn("worker", *APP, "--types", "work")

    async def succeeded() -> bool:
        return await status(state, task_id) == "succeeded"

    await eventually(succeeded, timeout_s=40)
    record = await state.store.get(task_id)
    assert record is not None
    assert record.worker != dead_worker
    assert record.attempts == 2
    assert await runs(state, task_id) == 2
    dead_consumer = consumer_name(dead_worker, "work")

    async def dead_consumer_removed() -> bool:
        names = [c.name for c in await state.streams.consumers("work")]
        return dead_consumer not in names

    await eventually(dead_consumer_removed, timeout_s=20)
    summary: Any = await state.redis.xpending(state.keys.stream("work"), GROUP)
    assert summary["pending"] == 0


async def test_sigterm_drains_in_flight_tasks_and_exits_zero(
    state: AppState, spawn: Spawner
) -> None:
    port = free_port()
    proc = spawn("run", *APP, "--port", str(port))
    base = f"http://127.0.0.1:{port}"
    await eventually(lambda: api_ready(base), timeout_s=30)
    async with httpx.AsyncClient(base_url=base) as http:
        created = await http.post("/v1/tasks/batch", json={
            "tasks": [{"type": "work", "payload": {"seconds": 2}} for _ in range(5)]
        })
        assert created.status_code == 202
        ids = [uuid.UUID(t["id"]) for t in created.json()["tasks"]]

    async def five_running() -> bool:
        value = await state.redis.get(f"{state.keys.prefix}:test:running")
        return int(value or 0) == 5

    await eventually(five_running, timeout_s=20)
    proc.signal(signal.SIGTERM)
    assert proc.wait(30) == 0, proc.output()[-3000:]
    for task_id in ids:
        assert await status(state, task_id) == "succeeded"
        assert await runs(state, task_id) == 1
    summary: Any = await state.redis.xpending(state.keys.stream("work"), GROUP)
    assert summary["pending"] == 0
    assert await state.workers.live(60) == []
    output = proc.output()
    assert '"embedded":false' in output  # URLs given: no embedded servers started
    assert "worker.drain.started" in output
    assert "conveyor.stopped" in output


async def test_a_second_signal_exits_at_once_leaving_work_pending(
    state: AppState, spawn: Spawner
) -> None:
    port = free_port()
    proc = spawn("run", *APP, "--port", str(port))
    await eventually(lambda: api_ready(f"http://127.0.0.1:{port}"), timeout_s=30)
    task_id = (await client_for(state).enqueue("work", {"seconds": 60})).record.id

    async def running() -> bool:
        return await status(state, task_id) == "running"

    await eventually(running, timeout_s=20)
    proc.signal(signal.SIGTERM)
    await asyncio.sleep(0.5)
    began = time.monotonic()
    proc.signal(signal.SIGINT)
    code = proc.wait(10)
    assert time.monotonic() - began < 5
    assert code == 130
    assert await status(state, task_id) == "running"
    summary: Any = await state.redis.xpending(state.keys.stream("work"), GROUP)
    assert summary["pending"] == 1  # left for the rebalancer once the heartbeat expires


async def test_two_cron_processes_fire_each_slot_once(state: AppState, spawn: Spawner) -> None:
    spawn("cron", *APP)
    spawn("cron", *APP)
    spawn("worker", *APP, "--types", "tick")
    pattern = f"{state.keys.prefix}:test:cron:*"

    async def four_slots_ran() -> bool:
        return len([k async for k in state.redis.scan_iter(pattern)]) >= 4

    await eventually(four_slots_ran, timeout_s=30)
    counts = [int(await state.redis.get(k) or 0) async for k in state.redis.scan_iter(pattern)]
    assert counts
    assert all(c == 1 for c in counts)
    rows = await state.pool.fetch(
        f"SELECT idempotency_key FROM {state.store.table} WHERE type = 'tick'"
    )
    keys = [r[0] for r in rows]
    assert len(keys) == len(set(keys)) >= 4


async def test_a_service_that_cannot_start_stops_the_process_with_a_readable_error(
    state: AppState, spawn: Spawner
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = spawn("run", *APP, "--port", str(port))
        code = proc.wait(30)
    output = proc.output()
    assert code != 0
    assert f"cannot listen on 127.0.0.1:{port}" in output
    assert "worker.stopped" in output  # the worker that did start was stopped, not left
