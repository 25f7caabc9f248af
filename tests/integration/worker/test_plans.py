"""The worker's start and outcome statements stay lookups by id however much the tasks table
has grown since their plans were made: a plan PostgreSQL caches while the table holds a few
rows scans it (or one of its indexes) whole, and it would read every row of the grown table
per statement. The
statements are prepared here by name (not by asyncpg, which prepares its own again every few
seconds), so the plan looked at is the one made on the small table."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from conveyor.state import AppState
from conveyor.store.pool import Connection, Pinned
from conveyor.worker.worker import pinned_sessions

WORKER = "plans-worker"


async def _queued(state: AppState, count: int, type_: str = "echo") -> list[uuid.UUID]:
    return [r[0] for r in await state.pool.fetch(
        f"INSERT INTO {state.settings.database_schema}.tasks (id, type, payload, max_attempts)"
        " SELECT gen_random_uuid(), $2, '{}', 1 FROM generate_series(1, $1) RETURNING id",
        count, type_)]


def _array(values: Sequence[object], sql_type: str) -> str:
    return f"ARRAY[{', '.join(repr(str(v)) for v in values)}]::{sql_type}[]"


def _start_args(ids: Sequence[uuid.UUID]) -> str:
    return f"{_array(ids, 'uuid')}, '{WORKER}'"


def _record_args(ids: Sequence[uuid.UUID]) -> str:
    """Each task succeeded at its first attempt."""
    n = len(ids)
    return (f"{_array(ids, 'uuid')}, {_array([1] * n, 'int')}, {_array(['succeeded'] * n, 'text')},"
            f" {_array(['{}'] * n, 'text')}, {_array([''] * n, 'text')},"
            f" {_array([0] * n, 'float8')}, '{WORKER}', {_array(['failed'] * n, 'text')}")


async def _plan(conn: Connection, name: str, args: str) -> str:
    rows = await conn.fetch(f"EXPLAIN EXECUTE {name}({args})")
    return "\n".join(r[0] for r in rows)


async def test_statements_planned_on_a_small_table_never_scan_it_once_it_has_grown(
    state: AppState,
) -> None:
    table = f"{state.settings.database_schema}.tasks"
    # No VACUUM or ANALYZE meanwhile: either would have the plans made again.
    await state.pool.execute(f"ALTER TABLE {table} SET (autovacuum_enabled = false)")
    # The statistics of a table that was big (they outlive TRUNCATE), as after a quiet spell.
    await _queued(state, 5_000, "elsewhere")
    await state.pool.execute(f"ANALYZE {table}")
    await state.pool.execute(f"TRUNCATE {table} CASCADE")
    start, record = (Pinned(state.pool, session=s) for s in pinned_sessions(state.settings))
    try:
        async with start.connection("test") as starting, record.connection("test") as recording:
            await starting.execute(f"PREPARE start AS {state.store._mark_running_sql}")
            await recording.execute(f"PREPARE record AS {state.store._record_sql}")
            for _ in range(8):  # three tasks at a time on a table of a few rows
                ids = await _queued(state, 3)
                assert len(await starting.fetch(f"EXECUTE start({_start_args(ids)})")) == 3
                assert len(await recording.fetch(f"EXECUTE record({_record_args(ids)})")) == 3
            await _queued(state, 20_000, "elsewhere")
            plans = [await _plan(starting, "start", _start_args(await _queued(state, 3))),
                     await _plan(recording, "record", _record_args(await _queued(state, 500)))]
    finally:
        await start.release()
        await record.release()
    for plan in plans:  # the given ids looked up, not a table or a whole index read
        assert "Seq Scan" not in plan, plan
        assert "Index Cond: (id = ANY ($1))" in plan, plan
