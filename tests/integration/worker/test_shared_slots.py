"""Slots shared by several task types in one worker, on real Postgres and Redis: a busy type
gets every slot however many idle types sit beside it, two busy types both progress, and the
idle types' waits end at once at shutdown and come back after a Redis restart."""

from __future__ import annotations

import asyncio
import time

import pytest
from structlog.testing import capture_logs

from conveyor.application import Conveyor
from conveyor.client import TaskRequest
from conveyor.config import Settings
from conveyor.runtime.shutdown import Shutdown
from conveyor.state import AppState, open_state
from conveyor.testing.servers import PostgresServer, RedisServer
from conveyor.worker.worker import Worker
from tests.apps import fair
from tests.conftest import eventually, make_settings
from tests.integration.worker.test_worker import StartWorker

pytestmark = pytest.mark.slow


@pytest.fixture
def settings(postgres: PostgresServer, redis_server: RedisServer) -> Settings:
    # the production read block: an idle type's blocking read lasts as long as it would there
    return make_settings(postgres, redis_server.url, read_block=1.0, concurrency=5)


@pytest.fixture
def app() -> Conveyor:
    fair.runs.clear()
    return fair.app


async def _enqueue(state: AppState, task_types: list[str], n: int, seconds: float) -> None:
    """`n` tasks of each type, interleaved, in one commit and one Redis pipeline."""
    await state.client.enqueue_many(
        [TaskRequest(t, {"seconds": seconds}) for _ in range(n) for t in task_types])


async def _blocked_reads(state: AppState, n: int) -> bool:
    """At least `n` Redis clients are blocked in a read of a stream."""
    clients: list[dict[str, str]] = await state.redis.client_list()
    return sum(c.get("cmd") in ("xread", "xreadgroup") and "b" in c.get("flags", "")
               for c in clients) >= n


async def _ran(task_type: str, n: int) -> bool:
    return sum(r.task_type == task_type for r in fair.runs) >= n


async def test_a_busy_type_gets_every_slot_beside_idle_types(
    state: AppState, start_worker: StartWorker
) -> None:
    worker = await start_worker(types=["busy", "idle1", "idle2", "idle3", "idle4"])

    await eventually(lambda: _blocked_reads(state, 5))  # every consumer waits for work
    began = time.monotonic()
    await _enqueue(state, ["busy"], 20, 0.6)
    published = time.monotonic()
    await eventually(lambda: _ran("busy", 20), timeout_s=30)
    peak, mean = fair.in_flight("busy")
    fifth = sorted(r.began for r in fair.runs)[4]
    print(f"\nbusy beside 4 idle types, CONCURRENCY=5: peak {peak}, mean {mean:.2f} in flight;"
          f" enqueue (commit + publish) {(published - began) * 1000:.0f} ms, 5 running"
          f" {(fifth - published) * 1000:.0f} ms after it returned")
    assert peak == worker.slots.capacity == 5
    # idle types holding a slot each would leave it one; the margin is for a loaded machine's
    # gap between one task's end and the next one's start
    assert mean >= 4.0


async def test_two_busy_types_both_progress(state: AppState, start_worker: StartWorker) -> None:
    await start_worker(types=["busy", "other", "idle1", "idle2"])
    await _enqueue(state, ["busy", "other"], 40, 0.1)
    await eventually(lambda: _ran("busy", 40), timeout_s=30)
    await eventually(lambda: _ran("other", 40), timeout_s=30)
    first_done = min(max(r.ended for r in fair.runs if r.task_type == t)
                     for t in ("busy", "other"))
    before = {t: sum(r.task_type == t and r.ended <= first_done for r in fair.runs)
              for t in ("busy", "other")}
    peak, mean = fair.in_flight("busy", "other")
    print(f"\ntwo busy types beside 2 idle ones: runs done when the first type was done {before}"
          f", both together: peak {peak}, mean {mean:.2f} in flight")
    # slots go to both in turn: neither waits for the other to drain ...
    assert min(before.values()) >= 20
    # ... and none of them to the idle types (holding two of the five, they would cap it at 3)
    assert mean >= 3.5


async def test_shutdown_cuts_idle_waits_short(state: AppState) -> None:
    worker = Worker(state, types=["busy", "idle1", "idle2"])
    for consumer in worker.consumers:
        consumer.block_ms = 30_000  # a wait that shutdown would otherwise sit out
    stop = Shutdown(5)
    running = asyncio.create_task(worker.run(stop))
    await eventually(lambda: _blocked_reads(state, 3))
    began = time.monotonic()
    stop.begin("test")
    await asyncio.wait_for(running, 20)
    assert time.monotonic() - began < 10


async def test_idle_types_wait_through_a_redis_restart(
    postgres: PostgresServer, own_redis: RedisServer, app: Conveyor
) -> None:
    settings = make_settings(postgres, own_redis.url, read_block=1.0)
    async with open_state(settings, app) as state:
        worker = Worker(state, types=["busy", "idle1", "idle2"])
        stop = Shutdown(5)
        running = asyncio.create_task(worker.run(stop))
        try:
            await eventually(lambda: _blocked_reads(state, 3))
            with capture_logs() as logs:
                own_redis.restart(wipe=True)  # the waits' connections drop; the groups are gone
                await _enqueue(state, ["idle1", "idle2"], 3, 0.01)
                await eventually(lambda: _ran("idle1", 3), timeout_s=20)
                await eventually(lambda: _ran("idle2", 3), timeout_s=20)
        finally:
            stop.begin("test")
            await asyncio.wait_for(running, 20)
        assert not running.exception()
        assert worker.processed == 6
        started = [e["component"] for e in logs if e["event"] == "outage.started"]
        assert len(set(started)) == len(started)  # noticed once per component
