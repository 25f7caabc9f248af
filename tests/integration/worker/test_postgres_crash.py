"""A crash of a durable PostgreSQL while handlers run. A start commits without waiting for the
disk (`CONVEYOR_START_COMMIT=async`): the crash forgets it, the task is `queued` again at its
previous attempt, the first run's outcome is superseded and the relay publishes the task again.
It runs again and succeeds once; with `sync` the crash forgets nothing and nothing runs twice."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from conveyor.application import Conveyor
from conveyor.runtime.shutdown import Shutdown
from conveyor.state import AppState, open_state
from conveyor.store.tasks import TaskRecord
from conveyor.testing.servers import PostgresServer, RedisServer
from conveyor.worker.worker import Worker
from tests.apps import basic
from tests.conftest import eventually, make_settings
from tests.integration.worker.test_outages import start_relay

pytestmark = pytest.mark.slow

TASKS = 4
RUN_S = 3.0  # the handlers outlive the crash and the restart


@pytest.fixture
def durable_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL of the test's own with the durability defaults, to crash."""
    base = Path(tempfile.mkdtemp(prefix="conveyor-pg-"))
    base.chmod(0o755)
    server = PostgresServer(base, durable=True)
    server.start()
    yield server
    server.stop()
    shutil.rmtree(base, ignore_errors=True)


async def _records(state: AppState, ids: list[uuid.UUID]) -> list[TaskRecord | None]:
    try:
        return [await state.store.get(i) for i in ids]
    except Exception:
        return []


async def _crash_while_running(
    pg: PostgresServer, redis: RedisServer, app: Conveyor, start_commit: str
) -> tuple[list[TaskRecord], list[TaskRecord], list[uuid.UUID]]:
    """Start TASKS sleeping tasks, crash Postgres once all are running, wait until all have
    succeeded; the records after the restart, the final ones, and the ids."""
    # A heartbeat beat is a synchronous commit, which would flush the starts before the crash.
    settings = make_settings(pg, redis.url, start_commit=start_commit,
                             heartbeat_interval=20.0, heartbeat_ttl=60.0)
    async with open_state(settings, app) as state:
        # The WAL writer flushes an async commit within three of its delays: the longest.
        await state.pool.execute("ALTER SYSTEM SET wal_writer_delay = '10s'")
        await state.pool.execute("SELECT pg_reload_conf()")
        ids = [(await state.client.enqueue("sleep", {"seconds": RUN_S})).record.id
               for _ in range(TASKS)]
        worker = Worker(state, types=["sleep"])
        stop = Shutdown(10)
        running = asyncio.create_task(worker.run(stop))

        async def all_running() -> bool:
            found = await _records(state, ids)
            return bool(found) and all(r is not None and r.status == "running" for r in found)

        await eventually(all_running, timeout_s=10)
        pg.stop("immediate")  # a crash: what is not on disk is gone
        pg.start()

        async def back() -> bool:
            return bool(await _records(state, ids[:1]))

        await eventually(back, timeout_s=20)
        after = [r for r in await _records(state, ids) if r is not None]
        relaying = start_relay(state, stop, "sleep")

        async def all_succeeded() -> bool:
            found = await _records(state, ids)
            return bool(found) and all(r is not None and r.status == "succeeded" for r in found)

        await eventually(all_succeeded, timeout_s=30)
        final = [r for r in await _records(state, ids) if r is not None]
        stop.begin()
        await asyncio.gather(running, relaying)
    return after, final, ids


async def test_a_crash_forgets_async_starts_and_their_tasks_run_again_once_recorded(
    durable_postgres: PostgresServer, redis_server: RedisServer, app: Conveyor
) -> None:
    after, final, ids = await _crash_while_running(durable_postgres, redis_server, app, "async")
    assert len(after) == TASKS
    # The starts were visible (every task was seen running) but not on disk.
    assert [(r.status, r.attempts) for r in after] == [("queued", 0)] * TASKS
    # Each ran twice, the first run's outcome superseded; each succeeded once, at attempt 1.
    assert all(basic.probe.runs[str(i)] == 2 for i in ids)
    assert [(r.status, r.attempts) for r in final] == [("succeeded", 1)] * TASKS


async def test_a_crash_keeps_sync_starts_and_nothing_runs_twice(
    durable_postgres: PostgresServer, redis_server: RedisServer, app: Conveyor
) -> None:
    after, final, ids = await _crash_while_running(durable_postgres, redis_server, app, "sync")
    assert [(r.status, r.attempts) for r in after] == [("running", 1)] * TASKS
    assert all(basic.probe.runs[str(i)] == 1 for i in ids)
    assert [(r.status, r.attempts) for r in final] == [("succeeded", 1)] * TASKS
