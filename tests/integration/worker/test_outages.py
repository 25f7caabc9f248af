"""Redis and Postgres restarting under a running worker: it waits, reconnects and carries on,
with no restart of its own and no task lost."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import pytest
from structlog.testing import capture_logs

from conveyor.api.app import create_app
from conveyor.application import Conveyor
from conveyor.cron.relay import Relay
from conveyor.runtime.shutdown import Shutdown
from conveyor.state import AppState, open_state
from conveyor.testing.servers import PostgresServer, RedisServer
from conveyor.worker.worker import Worker
from tests.apps import basic
from tests.conftest import eventually, judge, make_settings

pytestmark = pytest.mark.slow


async def run_worker(state: AppState) -> tuple[Worker, Shutdown, asyncio.Task[None]]:
    worker = Worker(state, types=["echo"])
    stop = Shutdown(5)
    return worker, stop, asyncio.create_task(worker.run(stop))


def start_relay(state: AppState, stop: Shutdown, task_type: str = "echo") -> asyncio.Task[None]:
    """A relay with a short grace, running until `stop` begins."""
    relay = Relay(state.redis, state.keys, state.streams, state.store, [task_type],
                  liveness=judge(state), interval_s=0.2, grace_s=0.5, ttl_s=3)
    return asyncio.create_task(relay.run(stop))


async def succeeded(state: AppState, task_id: uuid.UUID) -> bool:
    try:
        record = await state.store.get(task_id)
    except Exception:
        return False
    return record is not None and record.status == "succeeded"


async def test_redis_restart_without_persistence(
    postgres: PostgresServer, own_redis: RedisServer, app: Conveyor
) -> None:
    settings = make_settings(postgres, own_redis.url)
    async with open_state(settings, app) as state:
        worker, stop, running = await run_worker(state)
        before = (await state.client.enqueue("echo", {})).record.id
        await eventually(lambda: succeeded(state, before))
        with capture_logs() as logs:
            own_redis.stop()  # no persistence: it comes back empty
            await asyncio.sleep(1.5)
            own_redis.start()
            after = [(await state.client.enqueue("echo", {})).record.id for _ in range(5)]
            for task_id in after:
                await eventually(lambda t=task_id: succeeded(state, t), timeout_s=20)  # type: ignore[misc]
        stop.begin()
        await asyncio.wait_for(running, 10)
        assert not running.exception()
        assert worker.processed == 6
        outage_lines = [e for e in logs if e["event"] == "outage.started"]
        assert outage_lines  # the outage was noticed...
        assert len({e["component"] for e in outage_lines}) == len(outage_lines)  # ...once each
        assert any(e["event"] == "outage.ended" for e in logs)


async def test_tasks_waiting_in_redis_when_it_restarts_empty_are_relayed(
    postgres: PostgresServer, own_redis: RedisServer, app: Conveyor
) -> None:
    settings = make_settings(postgres, own_redis.url)
    async with open_state(settings, app) as state:
        waiting = [(await state.client.enqueue("echo", {})).record.id for _ in range(5)]
        assert await state.redis.xlen(state.keys.stream("echo")) == 5
        own_redis.restart(wipe=True)  # no persistence: the five messages are gone
        _, stop, running = await run_worker(state)
        relaying = start_relay(state, stop)
        for task_id in waiting:
            await eventually(lambda t=task_id: succeeded(state, t), timeout_s=20)  # type: ignore[misc]
        stop.begin()
        await asyncio.gather(running, relaying)
        assert all(basic.probe.runs[str(t)] == 1 for t in waiting)


async def test_redis_down_while_enqueueing_is_recovered_by_the_relay(
    postgres: PostgresServer, own_redis: RedisServer, app: Conveyor
) -> None:
    settings = make_settings(postgres, own_redis.url)
    async with open_state(settings, app) as state:
        own_redis.stop()
        accepted = (await state.client.enqueue("echo", {})).record.id  # committed, not published
        own_redis.start()
        _, stop, running = await run_worker(state)
        relaying = start_relay(state, stop)
        await eventually(lambda: succeeded(state, accepted), timeout_s=20)
        stop.begin()
        await asyncio.gather(running, relaying)
        assert basic.probe.runs[str(accepted)] == 1


async def test_postgres_restart_under_api_and_worker(
    own_postgres: PostgresServer, redis_server: RedisServer, app: Conveyor
) -> None:
    settings = make_settings(own_postgres, redis_server.url)
    async with open_state(settings, app) as state:
        worker, stop, running = await run_worker(state)
        transport = httpx.ASGITransport(app=create_app(state))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            first = (await http.post("/v1/tasks", json={"type": "echo", "payload": {}})).json()
            await eventually(lambda: succeeded(state, uuid.UUID(first["id"])))
            own_postgres.stop()
            down = await http.post("/v1/tasks", json={"type": "echo", "payload": {}})
            assert down.status_code == 503
            assert down.headers["content-type"] == "application/problem+json"
            assert down.headers["retry-after"]
            assert (await http.get("/readyz")).status_code == 503
            # A message published while Postgres is away waits, un-acked, in the worker.
            stray = uuid.uuid4()
            await state.redis.xadd(state.keys.stream("echo"), {"id": str(stray)})
            await asyncio.sleep(1.0)
            own_postgres.start()
            await eventually(lambda: _ready(http), timeout_s=20)
            again = (await http.post("/v1/tasks", json={"type": "echo", "payload": {}})).json()
            await eventually(lambda: succeeded(state, uuid.UUID(again["id"])), timeout_s=20)
        stop.begin()
        await asyncio.wait_for(running, 10)
        assert worker.processed >= 2
        letters = await state.streams.dead_letters("echo")
        assert [e["id"] for e in letters] == [str(stray)]  # handled once Postgres was back


async def _ready(http: httpx.AsyncClient) -> bool:
    return (await http.get("/readyz")).status_code == 200
