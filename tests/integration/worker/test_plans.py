"""The worker's start and outcome statements stay lookups by id however much the tasks table
has grown since their plans were made: a plan PostgreSQL caches while the table holds a few
rows is a sequential scan, and it would read every row of the grown table per statement."""

from __future__ import annotations

import uuid

from conveyor.state import AppState
from conveyor.store.pool import Pinned
from conveyor.store.tasks import Outcome
from conveyor.worker.worker import pinned_sessions

WORKER = "plans-worker"


async def _queued(state: AppState, count: int, type_: str = "echo") -> list[uuid.UUID]:
    return [r[0] for r in await state.pool.fetch(
        f"INSERT INTO {state.settings.database_schema}.tasks (id, type, payload, max_attempts)"
        " SELECT gen_random_uuid(), $2, '{}', 1 FROM generate_series(1, $1) RETURNING id",
        count, type_)]


async def _run(state: AppState, start: Pinned, record: Pinned) -> None:
    """Three tasks through the worker's two statements (a start, then their outcomes)."""
    ids = await _queued(state, 3)
    started, _ = await state.store.mark_running(ids, WORKER, via=start)
    assert {s.id for s in started} == set(ids)
    recorded = await state.store.record(
        [Outcome(i, "echo", 1, "succeeded", result_json="{}") for i in ids], WORKER, via=record)
    assert len(recorded) == len(ids)


async def _plan(pinned: Pinned, statement: str, args: str) -> str:
    """The plan the connection would run its prepared `statement` (found by its text) with."""
    async with pinned.connection("test") as conn:
        names = await conn.fetch("SELECT name FROM pg_prepared_statements"
                                 " WHERE strpos(statement, $1) > 0", statement)
        assert len(names) == 1, names
        rows = await conn.fetch(f"EXPLAIN EXECUTE {names[0][0]}({args})")
    return "\n".join(r[0] for r in rows)


async def test_statements_planned_on_a_small_table_never_scan_it_once_it_has_grown(
    state: AppState,
) -> None:
    # No ANALYZE meanwhile: it would have every cached plan made again.
    await state.pool.execute(f"ALTER TABLE {state.settings.database_schema}.tasks"
                             " SET (autovacuum_enabled = false)")
    start, record = (Pinned(state.pool, session=s) for s in pinned_sessions(state.settings))
    try:
        for _ in range(8):  # plans made on a table of a few rows, cached after five runs
            await _run(state, start, record)
        await _queued(state, 20_000, "elsewhere")
        for _ in range(3):
            await _run(state, start, record)
        ids = await _queued(state, 3)
        uuids = f"ARRAY[{', '.join(repr(str(i)) for i in ids)}]::uuid[]"
        starting = await _plan(start, "SET status = 'running'", f"{uuids}, '{WORKER}'")
        ones = ", ".join("1" for _ in ids)
        texts = ", ".join("'x'" for _ in ids)
        recording = await _plan(
            record, "c(id, attempt, status, result, error, delay, kind)",
            f"{uuids}, ARRAY[{ones}], ARRAY[{texts}], ARRAY[{texts}], ARRAY[{texts}],"
            f" ARRAY[{ones}]::float8[], '{WORKER}', ARRAY[{texts}]")
    finally:
        await start.release()
        await record.release()
    for plan in (starting, recording):
        assert "tasks_pkey" in plan, plan
        assert "Seq Scan" not in plan, plan
