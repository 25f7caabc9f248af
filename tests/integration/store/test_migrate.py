"""Migrations on a real Postgres: safe for a rolling deploy."""

from __future__ import annotations

import asyncio
import shutil
import time
import uuid
from importlib import resources
from pathlib import Path

import pytest

from conveyor.client import TaskRequest
from conveyor.errors import Conflict, SchemaTooNew
from conveyor.state import AppState, open_state
from conveyor.store.migrate import migrate, pending
from conveyor.worker.worker import Worker
from tests.apps import basic
from tests.integration.cron.test_janitor import StartWorker, fill_finished

SHIPPED = Path(str(resources.files("conveyor.store").joinpath("migrations")))


def with_extra(tmp_path: Path, name: str, sql: str) -> Path:
    """A migrations directory: those shipped, plus one more."""
    directory = tmp_path / "migrations"
    shutil.copytree(SHIPPED, directory)
    (directory / name).write_text(sql)
    return directory


async def test_a_schema_newer_than_the_code_refuses_to_start(state: AppState) -> None:
    schema = state.settings.database_schema
    await state.pool.execute(f"INSERT INTO {schema}.migrations (version, name) VALUES (9999, 'x')")
    with pytest.raises(SchemaTooNew, match="version 9999, newer than this Conveyor knows"):
        await migrate(state.pool, schema)
    with pytest.raises(SchemaTooNew):
        await pending(state.pool, schema)
    with pytest.raises(SchemaTooNew):
        async with open_state(state.settings, state.app):
            pass


async def test_a_migration_stuck_behind_a_lock_fails_fast(state: AppState, tmp_path: Path
                                                         ) -> None:
    directory = with_extra(tmp_path, "0999_column.sql",
                           "ALTER TABLE {schema}.tasks ADD COLUMN extra integer;\n")
    async with state.pool.acquire() as holder, holder.transaction():
        await holder.execute(f"LOCK TABLE {state.store.table} IN ACCESS SHARE MODE")
        started = time.monotonic()
        with pytest.raises(Conflict):
            await migrate(state.pool, state.settings.database_schema, directory=directory,
                          lock_timeout_s=0.2)
        assert time.monotonic() - started < 5
    # Once the lock is free, it applies; the version is recorded.
    assert await migrate(state.pool, state.settings.database_schema,
                         directory=directory) == [999]


async def test_a_concurrent_index_build_does_not_stall_enqueues_or_completions(
    state: AppState, start_worker: StartWorker, tmp_path: Path,
) -> None:
    await fill_finished(state, 300_000, age_s=3600)
    directory = with_extra(tmp_path, "0999_payload_index.sql", (
        "-- conveyor: no-transaction\n"
        "DROP INDEX CONCURRENTLY IF EXISTS {schema}.tasks_payload_value;\n"
        "CREATE INDEX CONCURRENTLY tasks_payload_value ON {schema}.tasks"
        " ((payload->>'value'), id);\n"))
    worker: Worker = await start_worker(types=["echo"])
    assert worker is not None
    stop = asyncio.Event()
    enqueue_s: list[float] = []
    completion_gaps: list[float] = []
    enqueued: list[uuid.UUID] = []

    async def produce() -> None:
        while not stop.is_set():
            if len(enqueued) - sum(basic.probe.runs.values()) > 200:
                await asyncio.sleep(0.005)
                continue
            began = time.perf_counter()
            inserted = await state.client.enqueue_many(
                [TaskRequest("echo", {"value": i}) for i in range(20)])
            enqueue_s.append(time.perf_counter() - began)
            enqueued.extend(i.record.id for i in inserted)

    async def watch_completions() -> None:
        """The longest spell in which nothing completed although work was waiting."""
        last_count, last_change = sum(basic.probe.runs.values()), time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.01)
            count = sum(basic.probe.runs.values())
            now = time.perf_counter()
            if count != last_count or len(enqueued) <= count:
                completion_gaps.append(now - last_change)
                last_count, last_change = count, now

    loops = [asyncio.create_task(produce()), asyncio.create_task(watch_completions())]
    await asyncio.sleep(1.0)  # running at speed before the build
    began = time.perf_counter()
    applied = await migrate(state.pool, state.settings.database_schema, directory=directory)
    build_s = time.perf_counter() - began
    await asyncio.sleep(0.5)
    stop.set()
    await asyncio.gather(*loops)
    assert applied == [999]
    valid = await state.pool.fetchval(
        "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass($1)",
        f"{state.settings.database_schema}.tasks_payload_value")
    assert valid is True
    print(f"\nindex build over 300,000 rows took {build_s:.2f} s; meanwhile the longest "
          f"enqueue took {max(enqueue_s) * 1000:.0f} ms ({len(enqueue_s)} calls) and the "
          f"longest spell without a completion was {max(completion_gaps) * 1000:.0f} ms")
    assert max(enqueue_s) < 1.0
    assert max(completion_gaps) < 1.0
