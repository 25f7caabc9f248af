"""The tasks-table layouts `python -m bench --scale` compares (part 1 of bench/scale.py).

Each layout is filled with N finished tasks and measured the same way: the cost of a
completion (mark running + record, batches of 100, as the worker writes them: time and WAL
per task; WAL per task again with a 64 KiB payload), of pruning 200,000 expired rows (rows/s,
WAL per row, the longest statement, which bounds the longest any lock was held, and the
longest round trip of a writer that enqueues and completes one task every 50 ms meanwhile),
of the queue counts, and table + index size per
million finished tasks. The layouts:

- `InPlace`: the tasks table as the shipped migrations leave it, or all but 0004 (status
  in full indexes, as 0001-0003 made them), optionally at a fillfactor: finished tasks
  stay where they ran; the janitor's batched DELETE prunes.
- `Partitioned`: the shipped columns and indexes on a table partitioned by range of id
  (UUIDv7, so by creation time), an hour a partition; pruned both by DETACH PARTITION
  CONCURRENTLY + DROP of partitions wholly expired and by the batched DELETE.
- `History`: the shipped table for live tasks and a narrow `tasks_history` (no idempotency
  key, run_at, cancel flag or progress; a primary key and one index) that a completion moves
  the task into (DELETE ... RETURNING feeding an INSERT, one statement); pruned by the
  janitor's DELETE on the history table.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any

COMPLETION_TASKS = 20_000
PRUNE_ROWS = 200_000
PRUNE_BATCH = 500
FILL_SPAN_S = 20 * 3600
PROBE_PERIOD_S = 0.05
BIG_PAYLOAD_BYTES = 64 * 1024  # base64 of random bytes: TOASTed, compresses little
# Settings the shipped migration 0004 gives the tasks table, repeated on every partition (a
# partitioned table has no storage parameters of its own).
_VACUUM_OPTIONS = ("autovacuum_vacuum_scale_factor = 0.01, "
                   "autovacuum_vacuum_insert_scale_factor = 0.01, "
                   "autovacuum_analyze_scale_factor = 0.02, autovacuum_vacuum_cost_delay = 1")


def fill_sql(table: str, *, run_at: bool = True) -> str:
    """INSERT $2 - $1 + 1 succeeded no-op tasks numbered $1..$2, finished over the last
    $3 seconds (row $4 the newest), with UUIDv7 ids of their creation times."""
    return f"""
        INSERT INTO {table} (id, type, status, payload, attempts, max_attempts, result,
                             worker, created_at, {'run_at, ' if run_at else ''}started_at,
                             finished_at)
        SELECT (lpad(to_hex(floor(extract(epoch FROM f.at) * 1000)::bigint), 12, '0')
                || '7' || substr(md5(g::text), 1, 3) || '8' || substr(md5(g::text), 4, 15)
               )::uuid,
               'noop', 'succeeded', '{{}}', 1, 3, 'null', 'bench-worker-1',
               f.at, {'f.at, ' if run_at else ''}f.at, f.at + interval '2 milliseconds'
        FROM generate_series($1::bigint, $2::bigint) AS g,
             LATERAL (SELECT now() - ($4 - g) * ($3 / $4::float8) * interval '1 second'
                      - interval '10 seconds' AS at) AS f"""


async def fill(conn: Any, table: str, rows: int, span_s: float, chunk: int = 250_000, *,
               run_at: bool = True, quiet: bool = False) -> float:
    """Fill `table` with `rows` finished tasks (see `fill_sql`), then VACUUM ANALYZE it."""
    began = time.perf_counter()
    for start in range(0, rows, chunk):
        await conn.execute(fill_sql(table, run_at=run_at), start + 1,
                           min(rows, start + chunk), span_s, rows)
        if not quiet:
            print(f"  filled {min(rows, start + chunk):,} / {rows:,}", flush=True)
    await conn.execute(f"VACUUM (ANALYZE) {table}")
    return time.perf_counter() - began


async def sizes(conn: Any, table: str) -> dict[str, int]:
    """Heap (with TOAST) and index bytes of `table`, summed over its partitions if any."""
    row = await conn.fetchrow(
        "SELECT sum(pg_table_size(relid))::bigint, sum(pg_indexes_size(relid))::bigint,"
        " sum(pg_total_relation_size(relid))::bigint FROM (SELECT relid FROM"
        " pg_partition_tree($1::regclass) UNION SELECT $1::regclass) AS p(relid)",
        table)
    assert row is not None
    return {"table": row[0], "indexes": row[1], "total": row[2]}


def migrations_dir(tmp: Path, without: int | None, *, fillfactor: int | None = None) -> Path:
    """The shipped migrations, all or all but number `without`; with `fillfactor`, one more
    that sets it (a variant measured beside the shipped layout)."""
    shipped = Path(str(resources.files("conveyor.store").joinpath("migrations")))
    out = tmp / f"migrations-{without or 'all'}-{fillfactor or 'shipped'}"
    out.mkdir(exist_ok=True)
    for f in shipped.iterdir():
        if f.suffix == ".sql" and int(f.name[:4]) != without:
            shutil.copy(f, out / f.name)
    if fillfactor is not None:
        (out / "0999_fillfactor.sql").write_text(
            f"ALTER TABLE {{schema}}.tasks SET (fillfactor = {fillfactor});\n")
    return out


def big_payload() -> str:
    """A JSON payload of BIG_PAYLOAD_BYTES, like a thumbnail task's image."""
    return json.dumps({"image": base64.b64encode(os.urandom(BIG_PAYLOAD_BYTES * 3 // 4))
                       .decode()})


def uuid_floor(moment: datetime) -> uuid.UUID:
    """The smallest UUIDv7 of `moment`'s millisecond: every task created before it is below."""
    return uuid.UUID(f"{int(moment.timestamp() * 1000):012x}" + "0" * 20)


@dataclass
class Prune:
    """One way of pruning PRUNE_ROWS expired rows, measured."""

    method: str
    rows: int = 0
    seconds: float = 0.0
    wal: int = 0
    longest_s: float = 0.0  # the longest statement: no lock it took outlived it
    writer_longest_s: float = 0.0  # the probe's longest enqueue + completion meanwhile
    writer_ops: int = 0


@dataclass
class Figures:
    completion_us: float = 0.0
    completion_wal: float = 0.0
    big_completion_wal: float = 0.0  # with a BIG_PAYLOAD_BYTES payload
    counts_ms_p50: float = 0.0
    size: dict[str, int] = field(default_factory=dict)
    prunes: list[Prune] = field(default_factory=list)


class InPlace:
    """Finished tasks stay in the tasks table as the shipped migrations leave it (all but
    number `without`, if given), at `fillfactor` if given; the janitor's batched DELETE
    prunes."""

    def __init__(self, label: str, without: int | None = None, fillfactor: int | None = None
                 ) -> None:
        self.label = label
        self.without = without
        self.fillfactor = fillfactor
        self.store: Any = None

    # -- set-up ---------------------------------------------------------------------------

    async def setup(self, pool: Any, schema: str, scratch: Path) -> None:
        from conveyor.store.migrate import migrate
        from conveyor.store.tasks import TaskStore

        await migrate(pool, schema,
                      directory=migrations_dir(scratch, self.without, fillfactor=self.fillfactor))
        self.store = TaskStore(pool, schema)
        await self.reshape(pool, schema)

    async def reshape(self, pool: Any, schema: str) -> None:
        """Change the migrated schema into this layout (nothing here)."""

    @property
    def finished_table(self) -> str:
        """Where the finished tasks are kept."""
        return str(self.store.table)

    async def fill(self, conn: Any, rows: int, *, quiet: bool = False) -> None:
        await fill(conn, self.finished_table, rows, FILL_SPAN_S, quiet=quiet)

    # -- the measured operations ----------------------------------------------------------

    async def insert(self, tasks: list[Any]) -> None:
        await self.store.insert(tasks)

    async def complete(self, ids: list[uuid.UUID], worker: str) -> int:
        """Start and record `ids` as the worker does; the number recorded."""
        from conveyor.store.tasks import Outcome

        started, _ = await self.store.mark_running(ids, worker)
        recorded = await self.store.record(
            [Outcome(s.id, "noop", s.attempt, "succeeded", "null") for s in started], worker)
        return len(recorded)

    async def counts(self) -> tuple[int, int, int]:
        """GET /v1/queues' counts of a type: queued, running, dead."""
        found = await self.store.counts("noop")
        return found.queued, found.running, found.dead

    async def prune_batch(self) -> tuple[int, float]:
        """One janitor batch (every row is expired: retention 60 s); (rows, seconds)."""
        batch = await self.store.prune("noop", "succeeded", 60.0, PRUNE_BATCH,
                                       lock_timeout_s=1.0)
        return len(batch.ids), batch.duration_s

    def prune_methods(self) -> list[str]:
        return ["batched DELETE"]

    async def prune(self, method: str, pool: Any, target: int) -> tuple[int, float]:
        """Prune about `target` rows by `method`; (rows, longest statement s)."""
        pruned, longest = 0, 0.0
        while pruned < target:
            rows, took = await self.prune_batch()
            pruned += rows
            longest = max(longest, took)
            if not rows:
                break
        return pruned, longest


class Partitioned(InPlace):
    """The shipped columns and indexes on a table partitioned by range of id, an hour a
    partition. Its idempotency index cannot be unique (a unique index on a partitioned table
    must hold the partition key), so keys would need a table of their own; here tasks are
    inserted without ON CONFLICT."""

    def __init__(self, label: str, hours_ahead: int = 2) -> None:
        super().__init__(label)
        self.hours_ahead = hours_ahead
        self.partitions: list[tuple[str, datetime]] = []  # (name, upper bound), oldest first

    async def reshape(self, pool: Any, schema: str) -> None:
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute(f"ALTER TABLE {schema}.tasks RENAME TO tasks_plain")
            indexes = await conn.fetch(
                "SELECT i.indexname, i.indexdef, x.indisunique, x.indisprimary"
                " FROM pg_indexes AS i JOIN pg_class AS c ON c.relname = i.indexname"
                " JOIN pg_namespace AS n ON n.oid = c.relnamespace AND n.nspname = i.schemaname"
                " JOIN pg_index AS x ON x.indexrelid = c.oid"
                " WHERE i.schemaname = $1 AND i.tablename = 'tasks_plain'", schema)
            await conn.execute(
                f"CREATE TABLE {schema}.tasks (LIKE {schema}.tasks_plain INCLUDING DEFAULTS"
                " INCLUDING CONSTRAINTS INCLUDING STORAGE) PARTITION BY RANGE (id)")
            # CASCADE: a foreign key a later migration points at the tasks table goes too.
            await conn.execute(f"DROP TABLE {schema}.tasks_plain CASCADE")
            await conn.execute(f"ALTER TABLE {schema}.tasks ADD PRIMARY KEY (id)")
            for row in indexes:
                if row["indisprimary"]:
                    continue
                sql = str(row["indexdef"]).replace(f" ON {schema}.tasks_plain ",
                                                   f" ON {schema}.tasks ")
                if row["indisunique"]:
                    sql = sql.replace("CREATE UNIQUE INDEX", "CREATE INDEX", 1)
                await conn.execute(sql)
            now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
            first = now - timedelta(seconds=FILL_SPAN_S + 3600)
            hours = int((now - first).total_seconds() // 3600) + 1 + self.hours_ahead
            for k in range(hours):
                low, high = first + timedelta(hours=k), first + timedelta(hours=k + 1)
                name = f"tasks_p{low:%Y%m%d%H}"
                await conn.execute(
                    f"CREATE TABLE {schema}.{name} PARTITION OF {schema}.tasks FOR VALUES"
                    f" FROM ('{uuid_floor(low)}') TO ('{uuid_floor(high)}')"
                    f" WITH ({_VACUUM_OPTIONS})")
                self.partitions.append((name, high))
        self.schema = schema

    async def insert(self, tasks: list[Any]) -> None:
        await self.store.pool.execute(
            f"INSERT INTO {self.store.table} (id, type, payload, max_attempts)"
            " SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[]::jsonb[], $4::int[])",
            [t.id for t in tasks], [t.type for t in tasks], [t.payload_json for t in tasks],
            [t.max_attempts for t in tasks])

    def prune_methods(self) -> list[str]:
        return ["DETACH CONCURRENTLY + DROP", "batched DELETE"]

    async def prune(self, method: str, pool: Any, target: int) -> tuple[int, float]:
        if method == "batched DELETE":
            return await super().prune(method, pool, target)
        pruned, longest = 0, 0.0
        cutoff = datetime.now(UTC) - timedelta(seconds=60)
        while pruned < target and self.partitions and self.partitions[0][1] <= cutoff:
            name, _ = self.partitions[0]
            part = f"{self.schema}.{name}"
            # For the report, not timed: exact, as the partition was vacuumed after its fill.
            rows = int(await pool.fetchval(
                "SELECT reltuples::bigint FROM pg_class WHERE oid = $1::regclass", part))
            t0 = time.perf_counter()
            # Droppable only when every row in it is finished and past its retention.
            pinned = await pool.fetchval(
                f"SELECT EXISTS (SELECT 1 FROM {part} WHERE status IN ('queued', 'running'))"
                f" OR EXISTS (SELECT 1 FROM {part} WHERE status IN ('succeeded', 'dead',"
                " 'cancelled') AND finished_at >= now() - interval '60 seconds')")
            longest = max(longest, time.perf_counter() - t0)
            if pinned:
                break
            for sql in (f"ALTER TABLE {self.store.table} DETACH PARTITION {part} CONCURRENTLY",
                        f"DROP TABLE {part}"):
                t0 = time.perf_counter()
                await pool.execute(sql)
                longest = max(longest, time.perf_counter() - t0)
            self.partitions.pop(0)
            pruned += rows
        return pruned, longest


class History(InPlace):
    """Live tasks in the shipped table; a completion moves the task to a narrow history
    table (one statement: DELETE ... RETURNING into INSERT), where the janitor prunes it."""

    async def reshape(self, pool: Any, schema: str) -> None:
        self.history = f"{schema}.tasks_history"
        await pool.execute(f"""
            CREATE TABLE {self.history} (
                id           uuid PRIMARY KEY,
                type         text NOT NULL,
                status       text NOT NULL CHECK (status IN ('succeeded', 'dead', 'cancelled')),
                payload      jsonb NOT NULL,
                attempts     integer NOT NULL,
                max_attempts integer NOT NULL,
                result       jsonb,
                last_error   text,
                worker       text,
                created_at   timestamptz NOT NULL,
                started_at   timestamptz,
                finished_at  timestamptz NOT NULL,
                attempt_log  jsonb NOT NULL DEFAULT '[]',
                trace_context jsonb
            ) WITH ({_VACUUM_OPTIONS});
            CREATE INDEX tasks_history_finished ON {self.history} (type, status, id)
                INCLUDE (finished_at)""")
        t, h = self.store.table, self.history
        # A final outcome moves the task; a retry (or a cancel requested meanwhile) would stay
        # an UPDATE in place, as TaskStore.record does: not needed by this benchmark's no-ops.
        self._move_sql = f"""
            WITH c AS (SELECT * FROM unnest($1::uuid[], $2::int[], $3::text[], $4::text[])
                                  AS c(id, attempt, status, result)),
                 moved AS (
                   DELETE FROM {t} AS t USING c
                   WHERE t.id = c.id AND t.status = 'running' AND t.worker = $5
                     AND t.attempts = c.attempt AND c.status <> 'queued'
                     AND t.id = ANY($1::uuid[])
                   RETURNING t.*, c.status AS outcome, c.result AS outcome_result)
            INSERT INTO {h} (id, type, status, payload, attempts, max_attempts, result, worker,
                             created_at, started_at, finished_at, attempt_log, trace_context)
            SELECT id, type, outcome, payload, attempts, max_attempts, outcome_result::jsonb,
                   worker, created_at, started_at, now(), attempt_log, trace_context
            FROM moved
            RETURNING id"""
        self._counts_sql = f"""
            SELECT
              (SELECT count(*) FROM {t} WHERE type = $1 AND status = 'queued'),
              (SELECT count(*) FROM {t} WHERE type = $1 AND status = 'running'),
              (SELECT count(*) FROM {h} WHERE type = $1 AND status = 'dead'),
              (SELECT min(run_at) FROM {t} WHERE type = $1 AND status = 'queued'
                                            AND run_at <= now())"""
        cutoff = "now() - $2 * interval '1 second'"
        floor = (f"(lpad(to_hex(floor(extract(epoch FROM {cutoff}) * 1000)::bigint), 12, '0')"
                 " || '00000000000000000000')::uuid")
        self._prune_sql = f"""
            WITH doomed AS (
              SELECT h.id FROM {h} AS h
              WHERE h.type = $1 AND h.status = 'succeeded' AND h.id < {floor}
                AND h.finished_at < {cutoff}
              ORDER BY h.type, h.status, h.id LIMIT $3
              FOR UPDATE SKIP LOCKED)
            DELETE FROM {h} AS h USING doomed
            WHERE h.id = doomed.id AND h.finished_at < {cutoff}
            RETURNING h.id"""

    @property
    def finished_table(self) -> str:
        return self.history

    async def fill(self, conn: Any, rows: int, *, quiet: bool = False) -> None:
        await fill(conn, self.history, rows, FILL_SPAN_S, run_at=False, quiet=quiet)

    async def complete(self, ids: list[uuid.UUID], worker: str) -> int:
        started, _ = await self.store.mark_running(ids, worker)
        moved = await self.store.pool.fetch(
            self._move_sql, [s.id for s in started], [s.attempt for s in started],
            ["succeeded"] * len(started), ["null"] * len(started), worker)
        return len(moved)

    async def counts(self) -> tuple[int, int, int]:
        row = await self.store.pool.fetchrow(self._counts_sql, "noop")
        return row[0], row[1], row[2]

    async def prune_batch(self) -> tuple[int, float]:
        async with self.store.pool.acquire() as conn:
            t0 = time.perf_counter()
            async with conn.transaction():
                await conn.execute("SET LOCAL lock_timeout = 1000")
                rows = await conn.fetch(self._prune_sql, "noop", 60.0, PRUNE_BATCH)
            return len(rows), time.perf_counter() - t0


async def _probe(layout: InPlace, stop: asyncio.Event, out: Prune) -> None:
    """Enqueue and complete one task every PROBE_PERIOD_S until `stop` (one at least); the
    longest round trip and the count go to `out`."""
    from conveyor.store.tasks import NewTask, new_task_id

    while True:
        t0 = time.perf_counter()
        task = NewTask(new_task_id(), "noop", "{}", 3)
        await layout.insert([task])
        await layout.complete([task.id], "probe")
        out.writer_longest_s = max(out.writer_longest_s, time.perf_counter() - t0)
        out.writer_ops += 1
        if stop.is_set():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), PROBE_PERIOD_S)


async def measure(layout: InPlace, url: str, schema: str, scratch: Path, rows: int, *,
                  completions: int = COMPLETION_TASKS, prune_rows: int = PRUNE_ROWS,
                  quiet: bool = False) -> Figures:
    """One layout's figures (see the module docstring); drops `schema` at the end."""
    from conveyor.store.pool import open_pool
    from conveyor.store.tasks import NewTask, new_task_id

    pool = await open_pool(url, min_size=1, max_size=4)
    out = Figures()
    try:
        await layout.setup(pool, schema, scratch)
        async with pool.acquire() as conn:
            await layout.fill(conn, rows, quiet=quiet)
            out.size = await sizes(conn, layout.finished_table)

        async def wal() -> int:
            # Where WAL is inserted, not where it has been written: after commits that do not
            # wait for the disk (synchronous_commit off, as in the tests) the write position
            # lags by whatever the WAL buffers still hold.
            return int(await pool.fetchval(
                "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')::bigint"))

        async def completions_cost(tasks: list[NewTask]) -> tuple[float, float]:
            """Seconds and WAL bytes per task of completing `tasks`, inserted beforehand."""
            for i in range(0, len(tasks), 100):
                await layout.insert(tasks[i:i + 100])
            # Vacuumed first, so autovacuum has nothing of these inserts left to do inside the
            # window: the WAL counted is the cluster's, and a vacuum of the big payloads'
            # fresh TOAST rows would be counted as the completions'.
            await pool.execute(f"VACUUM ANALYZE {layout.store.table}")
            done = 0
            w0, t0 = await wal(), time.perf_counter()
            for i in range(0, len(tasks), 100):
                done += await layout.complete([t.id for t in tasks[i:i + 100]], "w1")
            t1, w1 = time.perf_counter(), await wal()
            if done != len(tasks):
                raise RuntimeError(f"{layout.label}: {done} of {len(tasks)} completions")
            return (t1 - t0) / len(tasks), (w1 - w0) / len(tasks)

        took, written = await completions_cost(
            [NewTask(new_task_id(), "noop", "{}", 3) for _ in range(completions)])
        out.completion_us, out.completion_wal = took * 1e6, written
        _, out.big_completion_wal = await completions_cost(
            [NewTask(new_task_id(), "noop", big_payload(), 3)
             for _ in range(max(1, completions // 20))])
        times = []
        for _ in range(50):
            c0 = time.perf_counter()
            await layout.counts()
            times.append(time.perf_counter() - c0)
        out.counts_ms_p50 = sorted(times)[len(times) // 2] * 1000
        for method in layout.prune_methods():
            figures = Prune(method)
            stop = asyncio.Event()
            probe = asyncio.create_task(_probe(layout, stop, figures))
            w0, t0 = await wal(), time.perf_counter()
            try:
                figures.rows, figures.longest_s = await layout.prune(method, pool, prune_rows)
                figures.seconds = time.perf_counter() - t0
                figures.wal = await wal() - w0
            finally:
                stop.set()
                await probe
            out.prunes.append(figures)
        await pool.execute(f"DROP SCHEMA {schema} CASCADE")
    finally:
        await pool.close()
    return out
