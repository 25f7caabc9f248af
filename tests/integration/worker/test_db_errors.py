"""Database errors that are not an outage, raised by the real server under a running worker:
conflicts (deadlock, serialization failure, statement or lock timeout) and read-only
connections (a failover) are retried and every task completes; what Postgres refuses is
settled one task at a time; nothing is acked before its outcome is durable."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import Counter
from collections.abc import AsyncIterator, MutableMapping, Sequence
from typing import Any

import asyncpg
import pytest
from pydantic import BaseModel
from structlog.testing import capture_logs

from conveyor.application import Conveyor
from conveyor.config import Settings
from conveyor.errors import Unavailable
from conveyor.queue.keys import GROUP
from conveyor.registry import TaskContext
from conveyor.runtime.shutdown import Shutdown
from conveyor.state import AppState, open_state
from conveyor.store.pool import Pinned
from conveyor.store.tasks import Outcome, Recorded, TaskStore
from conveyor.testing.servers import PostgresServer, RedisServer
from conveyor.worker.worker import Worker
from tests.apps import basic
from tests.conftest import eventually, make_settings

pytestmark = pytest.mark.slow


def fault_sql(schema: str) -> str:
    """A BEFORE UPDATE trigger on the test schema's tasks table that raises real server errors.

    `faults(path, sqlstate, times, task_id)`: the first `times` updates on `path` ('start':
    queued → running, 'record': running → anything else), of `task_id` or of any task, raise
    `sqlstate` (or, for 'cancel', are cancelled by the server as a statement timeout would
    cancel them: query_canceled, 57014); a sequence per path counts them (sequences are not
    rolled back with the failed statement). `fenced(pid)`: every update from that backend
    fails read-only, as on a primary demoted under its open connections."""
    s = schema
    return f"""
    CREATE TABLE {s}.faults (path text NOT NULL, sqlstate text NOT NULL, times int NOT NULL,
                             task_id uuid);
    CREATE TABLE {s}.fenced (pid int PRIMARY KEY);
    CREATE SEQUENCE {s}.fault_start;
    CREATE SEQUENCE {s}.fault_record;
    CREATE FUNCTION {s}.inject() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE
        p text;
        f record;
    BEGIN
        IF EXISTS (SELECT 1 FROM {s}.fenced WHERE pid = pg_backend_pid()) THEN
            RAISE EXCEPTION 'cannot execute UPDATE in a read-only transaction'
                USING ERRCODE = '25006';
        END IF;
        IF OLD.status = 'queued' AND NEW.status = 'running' THEN
            p := 'start';
        ELSIF OLD.status = 'running' AND NEW.status <> 'running' THEN
            p := 'record';
        ELSE
            RETURN NEW;
        END IF;
        FOR f IN SELECT * FROM {s}.faults
                 WHERE path = p AND (task_id IS NULL OR task_id = NEW.id) LOOP
            IF nextval(('{s}.fault_' || p)::regclass) <= f.times THEN
                IF f.sqlstate = 'cancel' THEN  -- a real cancel, as a statement timeout does
                    PERFORM pg_cancel_backend(pg_backend_pid());
                    PERFORM pg_sleep(5);
                END IF;
                RAISE EXCEPTION 'injected % on %', f.sqlstate, p USING ERRCODE = f.sqlstate;
            END IF;
        END LOOP;
        RETURN NEW;
    END $$;
    CREATE TRIGGER inject BEFORE UPDATE ON {s}.tasks
        FOR EACH ROW EXECUTE FUNCTION {s}.inject();
    """


@pytest.fixture
async def faulty(state: AppState) -> AppState:
    await state.pool.execute(fault_sql(state.settings.database_schema))
    return state


async def inject(state: AppState, path: str, sqlstate: str, times: int,
                 task_id: uuid.UUID | None = None) -> None:
    await state.pool.execute(
        f"INSERT INTO {state.settings.database_schema}.faults VALUES ($1, $2, $3, $4)",
        path, sqlstate, times, task_id,
    )


async def statuses(state: AppState, ids: list[uuid.UUID]) -> dict[uuid.UUID, tuple[str, int]]:
    rows = await state.pool.fetch(
        f"SELECT id, status, attempts FROM {state.store.table} WHERE id = ANY($1::uuid[])", ids
    )
    return {r[0]: (r[1], r[2]) for r in rows}


async def all_succeeded(state: AppState, ids: list[uuid.UUID]) -> bool:
    try:
        found = await statuses(state, ids)
    except Exception:
        return False
    return len(found) == len(ids) and all(s == "succeeded" for s, _ in found.values())


async def pending(state: AppState, task_type: str) -> int:
    summary = await state.redis.xpending(state.keys.stream(task_type), GROUP)
    return int(summary["pending"])


async def enqueue(state: AppState, task_type: str, n: int) -> list[uuid.UUID]:
    return [(await state.client.enqueue(task_type, {})).record.id for _ in range(n)]


Running = tuple[Worker, Shutdown, asyncio.Task[None]]
_running: list[Running] = []


def start(state: AppState, types: list[str]) -> Running:
    worker = Worker(state, types=types)
    stop = Shutdown(5)
    _running.append((worker, stop, asyncio.create_task(worker.run(stop))))
    return _running[-1]


@pytest.fixture
async def workers() -> AsyncIterator[None]:
    """Workers a test started stop at its end, even when it fails (requested after the state
    fixture, so they stop before it closes)."""
    yield
    while _running:
        _, stop, running = _running.pop()
        stop.begin("test over")
        with contextlib.suppress(Exception):
            await asyncio.wait_for(running, 15)


async def stop_worker(stop: Shutdown, running: asyncio.Task[None]) -> None:
    stop.begin("test over")
    await asyncio.wait_for(running, 15)


@pytest.mark.parametrize("sqlstate", ["40P01", "40001", "cancel", "25006"])
async def test_conflicts_on_start_and_record_are_retried(
    faulty: AppState, workers: None, sqlstate: str
) -> None:
    state = faulty
    await inject(state, "start", sqlstate, 3)
    await inject(state, "record", sqlstate, 3)
    worker, stop, running = start(state, ["echo"])
    ids = await enqueue(state, "echo", 20)
    await eventually(lambda: all_succeeded(state, ids), timeout_s=30)
    assert not running.done()
    schema = state.settings.database_schema
    for path in ("start", "record"):  # every injected fault was hit
        assert await state.pool.fetchval(f"SELECT last_value FROM {schema}.fault_{path}") >= 3
    assert all(basic.probe.runs[str(t)] == 1 for t in ids)
    assert {a for _, a in (await statuses(state, ids)).values()} == {1}
    await eventually(lambda: _none_pending(state, "echo"))
    await stop_worker(stop, running)
    assert worker.processed == 20


async def _none_pending(state: AppState, task_type: str) -> bool:
    return await pending(state, task_type) == 0


async def test_connections_of_a_demoted_primary_are_replaced(
    faulty: AppState, workers: None
) -> None:
    state = faulty
    _, stop, running = start(state, ["echo"])
    first = await enqueue(state, "echo", 1)
    await eventually(lambda: all_succeeded(state, first))  # both pinned connections are open
    # Every connection open now answers updates with "read only", as after a failover that
    # left them on the old primary; only fresh connections can write.
    fenced = await state.pool.execute(
        f"INSERT INTO {state.settings.database_schema}.fenced"
        " SELECT pid FROM pg_stat_activity"
        " WHERE datname = current_database() AND application_name = 'conveyor'"
    )
    assert int(fenced.split()[-1]) >= 2
    with capture_logs() as logs:
        ids = await enqueue(state, "echo", 10)
        await eventually(lambda: all_succeeded(state, ids), timeout_s=30)
    assert not running.done()
    assert any(e["event"] == "store.failover" for e in logs)
    await stop_worker(stop, running)


async def test_a_start_postgres_refuses_fails_alone(faulty: AppState, workers: None) -> None:
    state = faulty
    ids = await enqueue(state, "echo", 5)  # read, and started, as one batch
    refused = ids[2]
    await inject(state, "start", "P0001", 1000, refused)
    with capture_logs() as logs:
        _, stop, running = start(state, ["echo"])
        others = [t for t in ids if t != refused]
        await eventually(lambda: all_succeeded(state, others))
        await eventually(lambda: _logged(logs, "worker.start.refused"))
    assert not running.done()
    assert (await statuses(state, [refused]))[refused] == ("queued", 0)
    assert await pending(state, "echo") == 1  # left for the rebalancer, not acked
    refusals = [e for e in logs if e["event"] == "starter.task.refused"]
    assert [e["task_id"] for e in refusals] == [str(refused)]
    await stop_worker(stop, running)


async def _logged(logs: list[MutableMapping[str, Any]], event: str) -> bool:
    return any(e["event"] == event for e in logs)


async def test_an_outcome_postgres_refuses_is_recorded_dead(
    faulty: AppState, workers: None
) -> None:
    state = faulty
    ids = await enqueue(state, "echo", 5)
    refused = ids[1]
    await inject(state, "record", "P0001", 2, refused)  # the batch, then the outcome alone
    _, stop, running = start(state, ["echo"])
    others = [t for t in ids if t != refused]
    await eventually(lambda: all_succeeded(state, others))
    record = await state.store.get(refused)
    assert record is not None
    assert record.status == "dead"
    assert "the outcome could not be stored" in (record.last_error or "")
    letters = await state.streams.dead_letters("echo")
    assert [e["id"] for e in letters] == [str(refused)]
    await eventually(lambda: _none_pending(state, "echo"))
    await stop_worker(stop, running)


async def test_an_outcome_that_cannot_be_recorded_at_all_is_not_acked(
    faulty: AppState, workers: None
) -> None:
    state = faulty
    ids = await enqueue(state, "echo", 5)
    lost = ids[3]
    await inject(state, "record", "P0001", 1000, lost)  # not even as dead
    with capture_logs() as logs:
        worker, stop, running = start(state, ["echo"])
        others = [t for t in ids if t != lost]
        await eventually(lambda: all_succeeded(state, others))
        await eventually(lambda: _logged(logs, "recorder.outcome.lost"))
    assert not running.done()
    assert (await statuses(state, [lost]))[lost] == ("running", 1)
    entries = await state.redis.xpending_range(state.keys.stream("echo"), GROUP, "-", "+", 10)
    assert len(entries) == 1  # its message alone stays pending, for the rebalancer
    # ... and is no longer refreshed by this worker's heartbeat, so the rebalancer takes it.
    assert all(h.task_id != str(lost) for h in worker.in_flight)
    await stop_worker(stop, running)


class LosesOneReply(TaskStore):
    """The real store, but the reply to its first `record` is lost after Postgres committed."""

    lose = 1

    async def record(
        self, outcomes: Sequence[Outcome], worker: str, *, via: Pinned | None = None
    ) -> list[Recorded]:
        recorded = await super().record(outcomes, worker, via=via)
        if self.lose:
            self.lose -= 1
            raise Unavailable("tasks.record", "connection lost before the reply")
        return recorded


async def test_an_outcome_whose_reply_was_lost_keeps_its_retry(state: AppState,
                                                               workers: None) -> None:
    worker, stop, running = start(state, ["flaky"])
    worker.recorder.store = LosesOneReply(state.pool, state.settings.database_schema)
    with capture_logs() as logs:
        task_id = (await state.client.enqueue("flaky", {"failures": 1})).record.id
        # The first attempt's retry was recorded, then its statement "failed": the retry of
        # that statement misses its compare-and-set, yet the retry is scheduled all the same.
        await eventually(lambda: all_succeeded(state, [task_id]))
    assert (await statuses(state, [task_id]))[task_id] == ("succeeded", 2)
    assert not any(e["event"] == "worker.outcome.superseded" for e in logs)
    await stop_worker(stop, running)


# -- recording while Postgres is down or read-only ---------------------------------------


class Gate:
    """Handlers of the `gate` type wait until it opens."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.opened = asyncio.Event()
        self.runs: Counter[str] = Counter()
        self.waiting = 0
        self.finished = 0


gate = Gate()
gated = Conveyor()


class Nothing(BaseModel):
    pass


@gated.task("gate", payload=Nothing)
async def gate_task(payload: Nothing, ctx: TaskContext) -> None:
    gate.runs[ctx.task_id] += 1
    gate.waiting += 1
    await gate.opened.wait()
    gate.finished += 1


@pytest.fixture
async def gated_state(own_postgres: PostgresServer, redis_server: RedisServer
                      ) -> AsyncIterator[tuple[AppState, PostgresServer]]:
    gate.reset()
    settings: Settings = make_settings(own_postgres, redis_server.url, concurrency=20)
    async with open_state(settings, gated) as opened:
        yield opened, own_postgres


async def read_only(dsn: str, on: bool) -> None:
    """Make every session of the server read-only (or writable again), as a demoted primary."""
    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute("SET default_transaction_read_only = off")
        value = "on" if on else "off"
        await admin.execute(f"ALTER SYSTEM SET default_transaction_read_only = {value}")
        await admin.execute("SELECT pg_reload_conf()")
    finally:
        await admin.close()


@pytest.mark.parametrize("fault", ["down", "read-only"])
async def test_outcomes_are_acked_only_once_recorded(
    gated_state: tuple[AppState, PostgresServer], workers: None, fault: str
) -> None:
    state, server = gated_state
    n = 20
    _, stop, running = start(state, ["gate"])
    ids = await enqueue(state, "gate", n)
    await eventually(lambda: _true(gate.waiting == n))
    with capture_logs() as logs:
        if fault == "down":
            server.stop()
        else:
            await read_only(server.dsn, True)
        gate.opened.set()  # the handlers finish while their outcomes cannot be written
        await eventually(lambda: _true(gate.finished == n))
        await eventually(lambda: _true(any(
            e["event"] == "outage.started" and e["component"] == "worker.record"
            for e in logs)))
        assert await pending(state, "gate") == n  # nothing acked that was not recorded
        await asyncio.sleep(0.5)  # a few retries later, still nothing
        assert await pending(state, "gate") == n
        if fault == "down":
            server.start()
        else:
            await read_only(server.dsn, False)
        await eventually(lambda: all_succeeded(state, ids), timeout_s=30)
        await eventually(lambda: _none_pending(state, "gate"))
    assert not running.done()
    assert {a for _, a in (await statuses(state, ids)).values()} == {1}
    assert all(gate.runs[str(t)] == 1 for t in ids)
    assert not any(e["event"] == "worker.outcome.superseded" for e in logs)
    await stop_worker(stop, running)


async def _true(value: bool) -> bool:
    return value
