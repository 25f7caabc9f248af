"""Redis loses its data under live workers (FLUSHALL, a deleted stream, a destroyed group) while
consumers are blocked in reads and a task longer than the heartbeat TTL runs: nothing exits,
the long task runs once and ends succeeded, and tasks enqueued afterwards complete."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest

from conveyor.application import Conveyor
from conveyor.cron.rebalance import Rebalancer
from conveyor.cron.relay import Relay
from conveyor.queue.keys import GROUP
from conveyor.runtime.shutdown import Shutdown
from conveyor.state import AppState, open_state
from conveyor.testing.servers import PostgresServer, RedisServer
from conveyor.worker.worker import Worker
from tests.apps import basic
from tests.conftest import eventually, judge, make_settings

pytestmark = pytest.mark.slow


@dataclass
class Running:
    state: AppState
    worker: Worker
    services: list[asyncio.Task[None]]


@pytest.fixture
async def running(
    postgres: PostgresServer, own_redis: RedisServer, app: Conveyor
) -> AsyncIterator[Running]:
    """A worker plus the cron service's rebalance and relay, ticking fast (heartbeat 1 s,
    TTL 3 s), so that anything that would take a live worker's task away gets its chance."""
    settings = make_settings(postgres, own_redis.url, pg_pool_max=12)  # two workers pin four
    async with open_state(settings, app) as state:
        stop = Shutdown(10)
        # One worker of one type (it blocks in XREADGROUP) runs the long task; one of two
        # types (its idle consumers wait in a plain XREAD, holding no slot) runs the rest.
        worker = Worker(state, types=["sleep"])
        other = Worker(state, types=["echo", "flaky"])
        liveness = judge(state)
        types = ["sleep", "echo", "flaky"]
        rebalancer = Rebalancer(state.redis, state.keys, state.streams, state.store, types,
                                liveness=liveness, interval_s=0.3,
                                ttl_s=settings.heartbeat_ttl, max_requeues=5)
        relay = Relay(state.redis, state.keys, state.streams, state.store, types,
                      liveness=liveness, interval_s=0.3, grace_s=1.0,
                      ttl_s=settings.heartbeat_ttl)
        services = [asyncio.create_task(s.run(stop))
                    for s in (worker, other, rebalancer, relay)]
        yield Running(state, worker, services)
        exited = [s for s in services if s.done()]
        stop.begin("test over")
        await asyncio.wait_for(asyncio.gather(*services, return_exceptions=True), 15)
        assert not exited, f"services exited on their own: {exited}"
        await state.pool.execute(f"DROP SCHEMA {settings.database_schema} CASCADE")


async def status(state: AppState, task_id: uuid.UUID) -> str | None:
    record = await state.store.get(task_id)
    return record.status if record else None


async def blocked_readers(state: AppState) -> bool:
    """Both kinds of blocked read are waiting: XREADGROUP and the idle XREAD."""
    clients: list[dict[str, str]] = await state.redis.client_list()
    blocked = {c.get("cmd") for c in clients if "b" in c.get("flags", "")}
    return {"xreadgroup", "xread"} <= blocked


Fault = Callable[[AppState], Awaitable[object]]


async def flushall(state: AppState) -> object:
    return await state.redis.flushall()


async def delete_streams(state: AppState) -> object:
    return await state.redis.delete(*(state.keys.stream(t) for t in ("sleep", "echo", "flaky")))


async def destroy_groups(state: AppState) -> object:
    for task_type in ("sleep", "echo", "flaky"):
        await state.redis.xgroup_destroy(state.keys.stream(task_type), GROUP)
    return None


@pytest.mark.parametrize("fault", [flushall, delete_streams, destroy_groups],
                         ids=["flushall", "stream-deleted", "group-destroyed"])
@pytest.mark.parametrize("max_attempts", [3, 1], ids=["attempts-left", "last-attempt"])
async def test_redis_loses_its_data_under_a_live_worker(
    running: Running, fault: Fault, max_attempts: int
) -> None:
    state = running.state
    ttl_s = state.settings.heartbeat_ttl
    long_task = (await state.client.enqueue(
        "sleep", {"seconds": ttl_s + 2.5}, max_attempts=max_attempts)).record.id
    await eventually(lambda: _began(long_task))
    await eventually(lambda: blocked_readers(state))
    await fault(state)
    after = [(await state.client.enqueue("echo", {})).record.id for _ in range(5)]
    for task_id in after:
        await eventually(lambda t=task_id: _is(state, t, "succeeded"), timeout_s=15)  # type: ignore[misc]
    await eventually(lambda: _is(state, long_task, "succeeded"), timeout_s=20)
    record = await state.store.get(long_task)
    assert record is not None
    assert record.attempts == 1  # never re-queued...
    assert record.worker == running.worker.worker_id
    assert basic.probe.runs[str(long_task)] == 1  # ...and run once
    assert all(basic.probe.runs[str(t)] == 1 for t in after)


async def _began(task_id: uuid.UUID) -> bool:
    return basic.probe.runs[str(task_id)] >= 1


async def _is(state: AppState, task_id: uuid.UUID, wanted: str) -> bool:
    return await status(state, task_id) == wanted
