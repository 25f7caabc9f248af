"""The layouts `python -m bench --scale` compares (bench/layouts.py) do what their figures
claim, on a real PostgreSQL, small: each is filled, its completions end the tasks where the
layout keeps finished ones, each pruning method removes only expired rows and as many as it
reports, and the report has a row per layout and method."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from bench import scale
from bench.layouts import BIG_PAYLOAD_BYTES, History, InPlace, Partitioned, measure, sizes

from conveyor.store.pool import Pool, open_pool
from conveyor.store.tasks import NewTask, new_task_id
from conveyor.testing.servers import PostgresServer

ROWS = 3_000


async def _count(pool: Pool, table: str, where: str = "TRUE") -> int:
    return int(await pool.fetchval(f"SELECT count(*) FROM {table} WHERE {where}"))


@pytest.mark.parametrize("layout", [
    InPlace("shipped"), Partitioned("partitioned"), History("history"),
], ids=lambda layout: layout.label)
async def test_a_layout_completes_in_its_place_and_prunes_only_expired_rows(
    postgres: PostgresServer, tmp_path: Path, layout: InPlace,
) -> None:
    schema = f"lay_{uuid.uuid4().hex[:8]}"
    pool = await open_pool(postgres.dsn, min_size=1, max_size=4)
    try:
        await layout.setup(pool, schema, tmp_path)
        async with pool.acquire() as conn:
            await layout.fill(conn, ROWS, quiet=True)
            size = await sizes(conn, layout.finished_table)
        assert size["table"] > 0
        assert size["indexes"] > 0
        assert size["total"] >= size["table"] + size["indexes"]
        assert await _count(pool, layout.finished_table) == ROWS

        tasks = [NewTask(new_task_id(), "noop", "{}", 3) for _ in range(150)]
        await layout.insert(tasks[:100])
        await layout.insert(tasks[100:])
        assert await layout.complete([t.id for t in tasks[:100]], "w1") == 100
        # Another worker's outcome is not recorded: the same compare-and-set as the worker's.
        assert await layout.complete([t.id for t in tasks[100:]], "w1") == 50
        assert await layout.complete([t.id for t in tasks[100:]], "w2") == 0
        done = f"id = ANY('{{{','.join(str(t.id) for t in tasks)}}}'::uuid[])"
        assert await _count(pool, layout.finished_table,
                            f"{done} AND status = 'succeeded'") == 150
        if isinstance(layout, History):
            assert await _count(pool, layout.store.table) == 0  # moved out, not copied
        assert await layout.counts() == (0, 0, 0)
        partitions = len(layout.partitions) if isinstance(layout, Partitioned) else 0

        for method in layout.prune_methods():
            before = await _count(pool, layout.finished_table)
            pruned, longest = await layout.prune(method, pool, 600)
            after = await _count(pool, layout.finished_table)
            assert pruned >= 600, method
            assert before - after == pruned, method
            assert longest > 0, method
            # The just-finished tasks are inside their retention: none of them went.
            assert await _count(pool, layout.finished_table, done) == 150, method
        if isinstance(layout, Partitioned):
            # Whole partitions went (the batched DELETE then emptied rows of the next ones).
            assert len(layout.partitions) < partitions
            assert len(layout.partitions) + 1 == int(await pool.fetchval(
                "SELECT count(*) FROM pg_partition_tree($1::regclass)", layout.store.table))
        await pool.execute(f"DROP SCHEMA {schema} CASCADE")
    finally:
        await pool.close()


async def test_every_layout_is_measured_and_reported(
    postgres: PostgresServer, tmp_path: Path,
) -> None:
    measured = []
    for number, layout in enumerate(scale.layouts()):
        # 1,000 completions, so 50 with the big payload: over fewer, the full-page images of
        # the pages they touch (after whichever checkpoint came last) weigh as much as it
        figures = await measure(layout, postgres.dsn, f"lay_all_{number}", tmp_path, ROWS,
                                completions=1000, prune_rows=600, quiet=True)
        assert figures.completion_us > 0, layout.label
        assert figures.completion_wal > 0, layout.label
        # A move copies the payload (TOAST included, compressed) into the history table; an
        # UPDATE in place keeps the payload where it is.
        if isinstance(layout, History):
            assert figures.big_completion_wal > 5 * figures.completion_wal, figures
        else:
            assert figures.big_completion_wal < BIG_PAYLOAD_BYTES / 4, (layout.label, figures)
        assert [p.method for p in figures.prunes] == layout.prune_methods()
        for prune in figures.prunes:
            assert prune.rows >= 600, prune
            assert prune.seconds > 0, prune
            assert prune.wal > 0, prune
            assert prune.writer_ops >= 1, prune  # the writer ran while it pruned
        measured.append((layout, figures))
    table = scale.layout_table(measured, ROWS)
    rows = [line for line in table if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == sum(len(layout.prune_methods()) for layout, _ in measured) == 6
    assert any("DETACH CONCURRENTLY + DROP" in row for row in rows)
    assert not await _count_schemas(postgres, "lay_all_")


async def _count_schemas(postgres: PostgresServer, prefix: str) -> int:
    pool = await open_pool(postgres.dsn, min_size=1, max_size=1)
    try:
        return int(await pool.fetchval(
            "SELECT count(*) FROM pg_namespace WHERE nspname LIKE $1", prefix + "%"))
    finally:
        await pool.close()
