"""The worker's start and outcome statements stay lookups of the given ids however much the
tasks table has grown since their plans were made: a plan PostgreSQL caches while the table
holds a few rows scans it (or one of its indexes) whole, and would read every row of the grown
table per statement.

The statements are prepared here by name (not by asyncpg, which prepares its own again every
few seconds), on a server of the test's own: another test's CREATE or DROP SCHEMA would have
every cached plan made again, on the grown table, and hide a bad one."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from conveyor.store.migrate import migrate
from conveyor.store.pool import Connection, Pinned, Pool, open_pool
from conveyor.store.tasks import TaskStore
from conveyor.testing.servers import PostgresServer
from conveyor.worker.worker import pinned_sessions
from tests.conftest import make_settings

SCHEMA = "plans"
WORKER = "plans-worker"


async def _queued(pool: Pool, count: int, type_: str = "echo") -> list[uuid.UUID]:
    return [r[0] for r in await pool.fetch(
        f"INSERT INTO {SCHEMA}.tasks (id, type, payload, max_attempts)"
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


async def _plan(conn: Connection, name: str, args: str) -> tuple[str, int]:
    """The plan `name` would run with, and how many custom plans it has been given."""
    rows = await conn.fetch(f"EXPLAIN EXECUTE {name}({args})")
    custom = await conn.fetchval(
        "SELECT custom_plans FROM pg_prepared_statements WHERE name = $1", name)
    return "\n".join(r[0] for r in rows), custom


async def test_statements_planned_on_a_small_table_never_scan_it_once_it_has_grown(
    own_postgres: PostgresServer,
) -> None:
    pool = await open_pool(own_postgres.dsn, min_size=1, max_size=3)
    try:
        await migrate(pool, SCHEMA)
        store = TaskStore(pool, SCHEMA)
        # No VACUUM or ANALYZE meanwhile: either would have the plans made again.
        await pool.execute(f"ALTER TABLE {SCHEMA}.tasks SET (autovacuum_enabled = false)")
        # Statistics of a big table, then a few rows: the benchmark's TRUNCATE before a phase.
        await _queued(pool, 5_000, "elsewhere")
        await pool.execute(f"ANALYZE {SCHEMA}.tasks")
        await pool.execute(f"TRUNCATE {SCHEMA}.tasks CASCADE")
        sessions = pinned_sessions(make_settings(own_postgres, None))
        start, record = (Pinned(pool, session=s) for s in sessions)
        try:
            async with start.connection("test") as starting, \
                    record.connection("test") as recording:
                await starting.execute(f"PREPARE start AS {store._mark_running_sql}")
                await recording.execute(f"PREPARE record AS {store._record_sql}")
                for _ in range(8):  # three tasks at a time on a table of a few rows
                    ids = await _queued(pool, 3)
                    assert len(await starting.fetch(f"EXECUTE start({_start_args(ids)})")) == 3
                    assert len(await recording.fetch(
                        f"EXECUTE record({_record_args(ids)})")) == 3
                await _queued(pool, 20_000, "elsewhere")
                plans = [await _plan(starting, "start", _start_args(await _queued(pool, 3))),
                         await _plan(recording, "record", _record_args(await _queued(pool, 3)))]
        finally:
            await start.release()
            await record.release()
    finally:
        await pool.close()
    for plan, custom in plans:  # the given ids looked up, not a table or a whole index read
        assert "Seq Scan" not in plan, plan
        assert "Index Cond: (id = ANY ($1))" in plan, plan
        assert custom == 0  # one plan kept: none made per statement
