"""A crash of a durable PostgreSQL while handlers run. A start commits without waiting for the
disk (`CONVEYOR_START_COMMIT=async`): the crash forgets it, the task is `queued` again at its
previous attempt and the relay publishes it again. The copy reaching the worker still running
the task makes the start again, and the run goes on to be recorded once; when the worker beats
first, it stops the forgotten runs and the copies run the tasks again, each recorded once. With
`sync` the crash forgets nothing."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from structlog.testing import capture_logs

from conveyor.application import Conveyor
from conveyor.client import TaskRequest
from conveyor.runtime.shutdown import Shutdown
from conveyor.state import AppState, open_state
from conveyor.store.tasks import TaskRecord
from conveyor.testing.servers import PostgresServer, RedisServer
from conveyor.worker.worker import Worker
from tests.apps import basic
from tests.conftest import eventually, make_settings, private_postgres
from tests.integration.worker.test_outages import start_relay

pytestmark = pytest.mark.slow

TASKS = 4
RUN_S = 5.0  # the handlers outlive the crash, the restart and the relay's copies


@pytest.fixture
def durable_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL of the test's own with the durability defaults, to crash."""
    with private_postgres(durable=True) as server:
        yield server


async def _records(state: AppState, ids: list[uuid.UUID]) -> list[TaskRecord | None]:
    try:
        return [await state.store.get(i) for i in ids]
    except Exception:
        return []


async def _all(state: AppState, ids: list[uuid.UUID], status: str) -> bool:
    found = await _records(state, ids)
    return bool(found) and all(r is not None and r.status == status for r in found)


async def _crash_while_running(
    pg: PostgresServer, redis: RedisServer, app: Conveyor, start_commit: str, *,
    beat_after_restart: bool = False,
) -> tuple[list[TaskRecord], list[TaskRecord], list[uuid.UUID], datetime]:
    """Start TASKS sleeping tasks, crash Postgres once all are running, wait until all have
    succeeded; the records after the restart, the final ones, the ids and the crash's time."""
    # A heartbeat beat is a synchronous commit, which would flush the starts before the crash.
    settings = make_settings(pg, redis.url, start_commit=start_commit,
                             heartbeat_interval=30.0, heartbeat_ttl=90.0)
    async with open_state(settings, app) as state:
        # The WAL writer writes an async commit out within its delay: the longest there is.
        await state.pool.execute("ALTER SYSTEM SET wal_writer_delay = '10s'")
        await state.pool.execute("SELECT pg_reload_conf()")
        worker = Worker(state, types=["sleep"])
        stop = Shutdown(10)
        running = asyncio.create_task(worker.run(stop))

        async def beaten() -> bool:  # its first beat is behind it, not beside the starts
            return any(w.id == worker.worker_id for w in await state.workers.live(90))

        await eventually(beaten, timeout_s=10)
        started = time.monotonic()
        # One commit for all (an enqueue commits synchronously, flushing any start before it).
        ids = [i.record.id for i in await state.client.enqueue_many(
            [TaskRequest("sleep", {"seconds": RUN_S}) for _ in range(TASKS)])]

        await eventually(lambda: _all(state, ids, "running"), timeout_s=8)
        crashed_at = datetime.now(UTC)
        assert time.monotonic() - started < 8, "too slow to crash within the WAL writer's delay"
        pg.stop("immediate")  # a crash: what is not on disk is gone
        pg.start()

        async def back() -> bool:
            return bool(await _records(state, ids[:1]))

        await eventually(back, timeout_s=20)
        after = [r for r in await _records(state, ids) if r is not None]
        if beat_after_restart:
            await worker.heartbeat.tick()
        relaying = start_relay(state, stop, "sleep")

        await eventually(lambda: _all(state, ids, "succeeded"), timeout_s=30)
        final = [r for r in await _records(state, ids) if r is not None]
        stop.begin()
        await asyncio.gather(running, relaying)
    return after, final, ids, crashed_at


async def test_a_crash_forgets_async_starts_and_the_relays_copies_make_them_again(
    durable_postgres: PostgresServer, redis_server: RedisServer, app: Conveyor
) -> None:
    with capture_logs() as logs:
        after, final, ids, crashed_at = await _crash_while_running(
            durable_postgres, redis_server, app, "async")
    assert len(after) == TASKS
    # The starts were visible (every task was seen running) but not on disk.
    assert [(r.status, r.attempts) for r in after] == [("queued", 0)] * TASKS
    # The relay's copies reached the worker still running the tasks: their starts (attempt 1
    # on this worker, as the forgotten ones) were made again and nothing ran twice; each
    # handler's outcome was recorded as its own.
    restored = [t for e in logs if e["event"] == "worker.start.restored" for t in e["tasks"]]
    assert sorted(restored) == sorted(str(i) for i in ids)
    assert all(basic.probe.runs[str(i)] == 1 for i in ids)
    assert basic.probe.peak == TASKS
    assert [(r.status, r.attempts) for r in final] == [("succeeded", 1)] * TASKS
    assert all(r.started_at is not None and r.started_at > crashed_at for r in final)
    assert not [e for e in logs if e["event"] == "worker.outcome.superseded"]


async def test_the_first_beat_after_the_crash_stops_the_runs_it_forgot(
    durable_postgres: PostgresServer, redis_server: RedisServer, app: Conveyor
) -> None:
    with capture_logs() as logs:
        after, final, ids, crashed_at = await _crash_while_running(
            durable_postgres, redis_server, app, "async", beat_after_restart=True)
    assert [(r.status, r.attempts) for r in after] == [("queued", 0)] * TASKS
    lost = [e for e in logs if e["event"] == "task.lease.lost"]
    assert sorted(e["task_id"] for e in lost) == sorted(str(i) for i in ids)
    assert all(basic.probe.runs[str(i)] == 2 for i in ids)
    assert [(r.status, r.attempts) for r in final] == [("succeeded", 1)] * TASKS
    assert all(r.started_at is not None and r.started_at > crashed_at for r in final)
    assert not [e for e in logs if e["event"] == "worker.outcome.superseded"]


async def test_a_crash_keeps_sync_starts_and_nothing_runs_twice(
    durable_postgres: PostgresServer, redis_server: RedisServer, app: Conveyor
) -> None:
    after, final, ids, _ = await _crash_while_running(
        durable_postgres, redis_server, app, "sync")
    assert [(r.status, r.attempts) for r in after] == [("running", 1)] * TASKS
    assert all(basic.probe.runs[str(i)] == 1 for i in ids)
    assert [(r.status, r.attempts) for r in final] == [("succeeded", 1)] * TASKS
