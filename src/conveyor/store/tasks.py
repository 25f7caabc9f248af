"""Task rows: insert, compare-and-set transitions, queries for the API, the relay and rebalance.

Every state change is one UPDATE guarded by the state it expects (compare-and-set), so a
redelivered or stale message can never run a finished task or record a completion twice:

    queued ──mark_running──▶ running ──record──▶ succeeded | dead | queued (retry)
    queued ──cancel──▶ cancelled;  dead | cancelled ──retry──▶ queued
    waiting ──last upstream final──▶ queued | cancelled (store/workflows.py, by a trigger)
    running (worker lost) ──requeue──▶ queued
    running (drain deadline) ──hand_back──▶ queued (the attempt not counted)
    running ──request_cancel──▶ running, cancel_requested (its worker stops it: ▶ cancelled)

A running task whose cancel was requested never goes back to queued: an outcome that would
retry it, a requeue and a hand-back end it `cancelled` instead. Every attempt that does not
succeed is appended to `attempt_log` by the statement that ends it (the successful one is the
row itself), so recording a success writes nothing more than it did.

Batched statements take arrays and `unnest` them: one round trip for many rows. Finished rows
leave by `prune` only (the janitor's), in bounded batches; a table that belongs to a task
references it `ON DELETE CASCADE`, so that one DELETE removes everything of a task.

The indexes are chosen for churn (migration 0004, docs/design/retention.md): `status` is in
two partial indexes only, one over live rows and one over finished rows, so statements that
filter on it name the status as a literal, which lets the planner prove which index applies.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import orjson

from conveyor.errors import Conflict
from conveyor.store.pool import Connection, Pinned, Pool, borrowed, translate

Status = Literal["waiting", "queued", "running", "succeeded", "dead", "cancelled"]
STATUSES: tuple[Status, ...] = ("waiting", "queued", "running", "succeeded", "dead",
                                "cancelled")
UpstreamFailure = Literal["cancel", "run"]
FinishedStatus = Literal["succeeded", "dead", "cancelled"]
FINISHED: tuple[FinishedStatus, ...] = ("succeeded", "cancelled", "dead")
# The idempotency keys of cron slots are never released: a slot fires once, however long ago.
CRON_KEY_PREFIX = "cron:"
# A worker may start a task this long before its run_at (clock skew between Redis and Postgres).
EARLY_START_S = 0.5
# Plan settings of the worker's two pinned connections (`Pinned(session=...)`), which run the
# start and the outcome statements (lookups of the given ids) for the worker's lifetime. By
# default PostgreSQL plans a prepared statement anew for its first five runs, then keeps a
# generic plan if that costs less than the custom ones did: one made while the tasks table
# holds a few rows is a sequential scan, and it stays one as the table grows, every statement
# reading every row, until a VACUUM or ANALYZE of the table or the statement's next preparing
# (`pool.STATEMENT_LIFETIME_S`). Here each statement keeps a generic plan made without
# sequential scans: a primary-key lookup of the given ids (each statement names them in an
# array an index condition takes, so that no plan walks a whole index instead), whatever the
# table's size then and now, made once per preparing, not per statement. (The dependents
# trigger the outcome fires plans its statements under the same settings.) JIT is off: up to
# PostgreSQL 17 a plan that has to scan a table anyway carries the disabled scan's huge cost,
# which had each run compiled (tens of milliseconds for a user trigger's one-row lookup).
WORKER_PLANS = ("SET plan_cache_mode = force_generic_plan; SET enable_seqscan = off;"
                " SET jit = off")
# Outcomes per outcome statement at most: each row finds its outcome by a scan of the id array,
# cheap at this size (~18 µs an outcome at 100, ~21 at 300), and one statement's row locks stay few.
RECORD_BATCH = 100


def new_task_id() -> uuid.UUID:
    """A UUIDv7: 48 bits of Unix milliseconds then random bits, so ids sort by creation time."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76
    value |= ((rand >> 62) & 0xFFF) << 64
    value |= 0b10 << 62
    value |= rand & ((1 << 62) - 1)
    return uuid.UUID(int=value)


@dataclass(frozen=True, slots=True)
class TaskRecord:
    """One row of the tasks table."""

    id: uuid.UUID
    type: str
    status: Status
    payload: Any
    idempotency_key: str | None
    attempts: int
    max_attempts: int
    result: Any
    last_error: str | None
    worker: str | None
    created_at: datetime
    run_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    cancel_requested: bool = False
    progress: Any = None  # {fraction, message, data, at}: the latest a handler reported
    priority: str | None = None  # 'high' or 'low'; None is 'default' (a type with priorities)
    # Workflows (store/workflows.py): what it waits for, what waits for it (filled by reads
    # that ask for it), how an upstream's failure resolves it, the workflow and its key
    # there, and the task whose handler enqueued it.
    depends_on: list[uuid.UUID] = field(default_factory=list)
    dependents: list[uuid.UUID] = field(default_factory=list)
    on_upstream_failure: UpstreamFailure = "cancel"
    workflow_id: uuid.UUID | None = None
    workflow_key: str | None = None
    parent_id: uuid.UUID | None = None
    attempt_history: list[dict[str, Any]] = field(default_factory=list)


# Status of a running task that goes back to queued: cancelled instead if that was asked for.
AFTER_CANCEL = ("status = CASE WHEN cancel_requested THEN 'cancelled' ELSE 'queued' END,"
                 " finished_at = CASE WHEN cancel_requested THEN now() ELSE NULL END")
_STORED = [name for name in TaskRecord.__slots__ if name != "attempt_history"]
# Columns whose record field is computed (migration 0007's, a NULL standing for the default).
_COMPUTED = {"depends_on": "coalesce(t.depends_on, '{}'::uuid[])",
             "dependents": "'{}'::uuid[]",
             "on_upstream_failure": "coalesce(t.on_upstream_failure, 'cancel')",
             "workflow_key": "t.node_key"}
_COLUMNS = ", ".join([*(_COMPUTED.get(name, f"t.{name}") for name in _STORED),
                      "t.attempt_log"])


def _record(row: Any) -> TaskRecord:
    values = list(row)
    log = values.pop()
    record = TaskRecord(*values)
    record.attempt_history.extend(attempt_history(record, log))
    return record


def attempt_history(record: TaskRecord, log: Any) -> list[dict[str, Any]]:
    """Every attempt of the task, oldest first: those the log holds (each that did not
    succeed), then the current one from the row itself (running, or the one that succeeded)."""
    entries = [_entry(e) for e in (orjson.loads(log) if isinstance(log, str | bytes)
                                   else log or [])]
    if record.attempts < 1 or record.started_at is None:
        return entries
    last = entries[-1] if entries else None
    if (last is not None and last.get("number") == record.attempts
            and last.get("worker") == record.worker
            and last.get("started_at") == record.started_at):
        return entries  # the current attempt has ended and is logged already
    if record.status not in ("running", "succeeded"):
        return entries
    entries.append({
        "number": record.attempts,
        "worker": record.worker,
        "started_at": record.started_at,
        "finished_at": record.finished_at,
        "outcome": None if record.status == "running" else "succeeded",
        "error": None,
    })
    return entries


def _moment(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value
    try:
        return datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        return None


def _entry(raw: dict[str, Any]) -> dict[str, Any]:
    """A log entry in the order and form the API shows (times as datetimes)."""
    return {"number": raw.get("number"), "worker": raw.get("worker"),
            "started_at": _moment(raw.get("started_at")),
            "finished_at": _moment(raw.get("finished_at")),
            "outcome": raw.get("outcome"), "error": raw.get("error")}


# One entry of attempt_log, built in SQL from the row being changed (`t`).
def _log_entry(outcome_sql: str, error_sql: str) -> str:
    return (f"jsonb_build_array(jsonb_build_object('number', t.attempts, 'worker', t.worker,"
            f" 'started_at', t.started_at, 'finished_at', now(), 'outcome', {outcome_sql},"
            f" 'error', {error_sql}))")


WORKER_LOST = _log_entry("'worker_lost'", "NULL")


def _json_or_none(value: dict[str, str] | None) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


def _insert_args(tasks: Sequence[NewTask]) -> tuple[list[Any], ...]:
    return (
        [t.id for t in tasks],
        [t.type for t in tasks],
        [t.payload_json for t in tasks],
        [t.idempotency_key for t in tasks],
        [t.max_attempts for t in tasks],
        [t.delay_s for t in tasks],
        [_json_or_none(t.trace_context) for t in tasks],
        [t.priority for t in tasks],
        [t.unique_key for t in tasks],
        [t.unique_for_s for t in tasks],
    )


def _insert_statement(table: str, extra: Sequence[tuple[str, str, str]]) -> str:
    """The insert of `TaskStore.insert`: $1-$10 a plain task's arrays (`_insert_args`), then
    one per `extra` column (see ExtraColumns)."""
    names = "".join(f", {c[0]}" for c in extra)
    arrays = "".join(f", ${11 + i}::{c[1]}[]" for i, c in enumerate(extra))
    values = "".join(f", {c[2]}" for c in extra)
    return f"""
            INSERT INTO {table} AS t (id, type, payload, idempotency_key, max_attempts, run_at,
                                      trace_context, priority, unique_key, unique_until{names})
            SELECT u.id, u.type, u.payload::jsonb, u.key, u.max_attempts,
                   now() + u.delay * interval '1 second', u.trace::jsonb, u.priority,
                   u.unique_key, now() + u.unique_for * interval '1 second'{values}
            FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::int[], $6::float8[],
                        $7::text[], $8::text[], $9::text[], $10::float8[]{arrays})
                 AS u(id, type, payload, key, max_attempts, delay, trace, priority, unique_key,
                      unique_for{names})
            -- (type, idempotency_key) or (type, unique_key): either returns the task there
            ON CONFLICT DO NOTHING
            RETURNING {_COLUMNS}"""


@dataclass(frozen=True, slots=True)
class ExtraColumns:
    """Columns an insert sets beyond a plain task's (a workflow node's: `store/workflows.py`):
    per column its name, its values' SQL type (an array parameter `u.<name>` of it) and the
    expression inserted (over `u.*`); `values` holds each task's, by id, in that order."""

    columns: tuple[tuple[str, str, str], ...]
    values: Mapping[uuid.UUID, tuple[Any, ...]]

    def args(self, tasks: Sequence[NewTask]) -> list[list[Any]]:
        rows = [self.values[t.id] for t in tasks]
        return [[r[i] for r in rows] for i in range(len(self.columns))]


@dataclass(frozen=True, slots=True)
class NewTask:
    """A task to insert; `payload_json` is already validated and serialised."""

    id: uuid.UUID
    type: str
    payload_json: str
    max_attempts: int
    idempotency_key: str | None = None
    delay_s: float = 0.0
    # The enqueuing span's context (`conveyor.tracing`), None with tracing off.
    trace_context: dict[str, str] | None = None
    priority: str | None = None  # 'high' or 'low'; None is 'default' (flow control)
    # One task per (type, unique key) while queued or running, or for unique_for_s seconds.
    unique_key: str | None = None
    unique_for_s: float | None = None


@dataclass(frozen=True, slots=True)
class Inserted:
    record: TaskRecord
    created: bool  # False: an earlier task with the same idempotency key was returned


@dataclass(frozen=True, slots=True)
class Started:
    """A task this worker now owns (status running, attempts already incremented)."""

    id: uuid.UUID
    type: str
    payload: Any
    attempt: int
    max_attempts: int
    run_at: datetime
    trace_context: dict[str, str] | None = None  # the enqueuing span's (`conveyor.tracing`)
    started_at: datetime | None = None
    priority: str | None = None  # 'high' or 'low'; None is 'default'


@dataclass(frozen=True, slots=True)
class NotStarted:
    """Why a message's task could not be started."""

    id: uuid.UUID
    status: Status | None  # None: no such task
    run_at: datetime | None
    exhausted: bool  # queued, but every attempt is used up (its last worker died mid-run)
    # Running on the very worker that asked: its own start, whose reply was lost before a
    # retry, or a copy of a message it is already working on. The caller tells them apart.
    running_here: Started | None = None
    # Postgres refused to start it, for this reason (an error retrying does not cure): the task
    # is left as it is, and its message pending.
    refused: str | None = None
    priority: str | None = None  # 'high' or 'low'; None is 'default'


@dataclass(frozen=True, slots=True)
class Outcome:
    """The result of one handler run, to be recorded if this worker still owns the attempt."""

    task_id: uuid.UUID
    task_type: str
    attempt: int
    status: Literal["succeeded", "queued", "dead", "cancelled"]
    result_json: str | None = None
    error: str | None = None
    delay_s: float = 0.0
    # How the attempt ended when it did not succeed: failed, timed_out or cancelled.
    kind: AttemptOutcome = "failed"


AttemptOutcome = Literal["failed", "timed_out", "lease_lost", "cancelled", "worker_lost"]


@dataclass(frozen=True, slots=True)
class Recorded:
    task_id: uuid.UUID
    status: Status  # `cancelled` for an outcome that would have retried a cancelled task
    run_at: datetime
    started_at: datetime | None = None
    at: datetime | None = None  # when it was recorded (the attempt's end)
    priority: str | None = None  # 'high' or 'low'; None is 'default' (its retry's level)


@dataclass(frozen=True, slots=True)
class Returned:
    """Tasks taken back from a lost or stopping worker: `queued` again, or `cancelled` (with
    when) because a cancel was requested of them while they ran."""

    queued: list[uuid.UUID]
    cancelled: list[tuple[uuid.UUID, datetime]]

    @classmethod
    def of(cls, rows: Sequence[Any]) -> Returned:
        return cls([r[0] for r in rows if r[1] == "queued"],
                   [(r[0], r[2]) for r in rows if r[1] == "cancelled"])


@dataclass(frozen=True, slots=True)
class QueueCounts:
    queued: int
    running: int
    dead: int
    oldest_due: datetime | None


def _literal(status: Status) -> str:
    """A status as an SQL literal (partial indexes are matched on literals, not parameters)."""
    if status not in STATUSES:
        raise ValueError(f"unknown status {status!r}")
    return f"'{status}'"


def _uuid_floor(moment_sql: str) -> str:
    """SQL for the smallest UUIDv7 of the millisecond `moment_sql` (a timestamptz expression):
    every task created before it has a smaller id."""
    return (f"(lpad(to_hex(floor(extract(epoch FROM {moment_sql}) * 1000)::bigint), 12, '0')"
            " || '00000000000000000000')::uuid")


@dataclass(frozen=True, slots=True)
class Pruned:
    """One janitor batch: the ids deleted and how long its statement (and locks) lasted."""

    ids: list[uuid.UUID]
    duration_s: float


class TaskStore:
    """All SQL on the tasks table of one schema.

    `idempotency_ttl_s`: an idempotency key older than this (by its task's created_at) is
    released when it is used again, making a new task; 0 keeps keys forever.
    """

    def __init__(self, pool: Pool, schema: str, *, acquire_timeout_s: float = 5.0,
                 idempotency_ttl_s: float = 0.0) -> None:
        self.pool = pool
        self.acquire_timeout_s = acquire_timeout_s
        self.idempotency_ttl_s = idempotency_ttl_s
        self.table = f"{schema}.tasks"
        # NOTIFY channel for tasks enqueued inside a caller's transaction (sent on commit).
        self.channel = f"{schema}_enqueued"
        t = self.table
        self._insert_sql = _insert_statement(t, ())
        # $1 types, $2 unique keys. A unique key holds while its task is queued or running,
        # or until its unique_until; past both it is released here, for a new task to take.
        self._release_unique_sql = f"""
            UPDATE {t} AS t SET unique_key = NULL
            FROM unnest($1::text[], $2::text[]) AS u(type, key)
            WHERE t.type = u.type AND t.unique_key = u.key
              AND t.status IN ('succeeded', 'dead', 'cancelled') AND t.unique_until <= now()
            RETURNING u.type, u.key"""
        self._existing_unique_sql = f"""
            SELECT {_COLUMNS}, t.unique_key FROM {t} AS t
            JOIN unnest($1::text[], $2::text[]) AS u(type, key)
              ON t.type = u.type AND t.unique_key = u.key"""
        self._existing_sql = f"""
            SELECT {_COLUMNS} FROM {t} AS t
            JOIN unnest($1::text[], $2::text[]) AS u(type, key)
              ON t.type = u.type AND t.idempotency_key = u.key"""
        # $1 types, $2 keys, $3 TTL s. Takes the key from tasks created more than the TTL ago
        # (not from cron slots), so that inserting again makes a new task; returns the pairs.
        self._release_keys_sql = f"""
            UPDATE {t} AS t SET idempotency_key = NULL
            FROM unnest($1::text[], $2::text[]) AS u(type, key)
            WHERE t.type = u.type AND t.idempotency_key = u.key
              AND t.created_at < now() - $3 * interval '1 second'
              AND t.idempotency_key NOT LIKE '{CRON_KEY_PREFIX}%'
            RETURNING u.type, u.key"""
        self._mark_running_sql = f"""
            UPDATE {t} AS t
            SET status = 'running', attempts = t.attempts + 1, worker = $2,
                started_at = now(), finished_at = NULL
            WHERE t.id = ANY($1::uuid[])
              -- The status and run_at tests are written so that no index can serve them and
              -- the queued-only partial index is not implied: the plan stays a lookup of the
              -- given ids, whatever the statistics say (when they claim few queued rows, a
              -- scan of every queued task per batch would otherwise look cheaper).
              AND NOT (t.status IS DISTINCT FROM 'queued')
              AND t.run_at - now() <= interval '{EARLY_START_S} seconds'
              AND t.attempts < t.max_attempts
            RETURNING t.id, t.type, t.payload, t.attempts, t.max_attempts, t.run_at,
                      t.trace_context, t.started_at, t.priority"""
        # Each row takes its outcome from the arrays at its id's position: one lookup of the
        # given ids, no join (a join of the rows with the unnested outcomes compared every row
        # with every outcome: 1.8 ms more at 100 outcomes). An outcome that would retry a
        # task whose cancel was requested ends it cancelled.
        self._record_sql = f"""
            UPDATE {t} AS t
            SET (status, result, last_error, run_at, finished_at, attempt_log) = (
                SELECT c.final,
                       CASE WHEN c.status = 'succeeded' THEN c.result::jsonb ELSE t.result END,
                       CASE WHEN c.status = 'succeeded' THEN NULL ELSE c.error END,
                       CASE WHEN c.final = 'queued'
                            THEN now() + c.delay * interval '1 second' ELSE t.run_at END,
                       CASE WHEN c.final = 'queued' THEN NULL ELSE now() END,
                       CASE WHEN c.status = 'succeeded' THEN t.attempt_log
                            ELSE t.attempt_log || {_log_entry('c.kind', 'c.error')} END
                FROM (SELECT o.*, CASE WHEN o.status = 'queued' AND t.cancel_requested
                                       THEN 'cancelled' ELSE o.status END AS final
                      FROM (SELECT ($3::text[])[i] AS status, ($4::text[])[i] AS result,
                                   ($5::text[])[i] AS error, ($6::float8[])[i] AS delay,
                                   ($8::text[])[i] AS kind
                            FROM array_position($1::uuid[], t.id) AS i) AS o) AS c)
            -- The array of ids is an index condition for the rows: the plan stays a lookup of
            -- them, whatever the table's size when it was made (see WORKER_PLANS).
            WHERE t.id = ANY($1::uuid[])
              AND t.attempts = ($2::int[])[array_position($1::uuid[], t.id)]
              -- Written so that no other index serves them (as in the start): a scan of the
              -- running-by-worker index walks every entry it holds, the dead ones of tasks
              -- finished since the last vacuum included, per batch.
              AND NOT (t.status IS DISTINCT FROM 'running')
              AND NOT (t.worker IS DISTINCT FROM $7)
            RETURNING t.id, t.status, t.run_at, t.started_at, now(), t.priority"""

    @contextlib.asynccontextmanager
    async def _connection(self, op: str, via: Pinned | None = None) -> AsyncIterator[Connection]:
        """A pooled connection (or `via`'s); Overloaded if none frees up in time, Unavailable
        if Postgres does not answer."""
        if via is not None:
            async with via.connection(op) as pinned:
                yield pinned
            return
        async with borrowed(self.pool, self.acquire_timeout_s, op) as conn:
            yield conn

    async def _fetch(self, op: str, sql: str, *args: Any, via: Pinned | None = None
                     ) -> list[Any]:
        async with self._connection(op, via) as conn:
            return await conn.fetch(sql, *args)

    async def _fetchrow(self, op: str, sql: str, *args: Any) -> Any:
        async with self._connection(op) as conn:
            return await conn.fetchrow(sql, *args)

    # -- enqueue ---------------------------------------------------------------------------

    async def insert(
        self, tasks: Sequence[NewTask], conn: Connection | None = None, *,
        via: Pinned | None = None, extra: ExtraColumns | None = None,
    ) -> list[Inserted]:
        """Insert tasks in one statement (on `conn` when given, to join its transaction),
        setting `extra` columns too when given.

        A task whose (type, idempotency key) exists already is not inserted; the existing row is
        returned with `created=False`. Results follow the order of `tasks`.
        """
        if not tasks:
            return []
        sql = self._insert_sql if extra is None else self._insert_with(extra)

        def args(these: Sequence[NewTask]) -> list[list[Any]]:
            return [*_insert_args(these), *(extra.args(these) if extra is not None else ())]

        if conn is None:
            async with self._connection("tasks.insert", via) as own:
                return await self._insert(own, tasks, sql, args)
        with translate("tasks.insert"):
            return await self._insert(conn, tasks, sql, args)

    def _insert_with(self, extra: ExtraColumns) -> str:
        return _insert_statement(self.table, extra.columns)

    async def _insert(
        self, conn: Connection, tasks: Sequence[NewTask], sql: str,
        args: Callable[[Sequence[NewTask]], list[list[Any]]],
    ) -> list[Inserted]:
        rows = await conn.fetch(sql, *args(tasks))
        created = {row[0]: _record(row) for row in rows}
        if len(created) == len(tasks):
            return [Inserted(created[t.id], True) for t in tasks]
        same = await self._unique(conn, [t for t in tasks
                                         if t.id not in created and t.unique_key], created)
        found: dict[tuple[str, str | None], TaskRecord] = {}
        # A key taken by a task past the idempotency TTL is released and the task inserted
        # again; a key released by a concurrent caller (not found, not inserted) is tried
        # again too. Three rounds settle any such race.
        for _ in range(3):
            missing = [t for t in tasks
                       if t.id not in created and t.idempotency_key is not None
                       and (t.type, t.unique_key) not in same
                       and (t.type, t.idempotency_key) not in found]
            if not missing:
                break
            released = []
            if self.idempotency_ttl_s > 0:
                released = await conn.fetch(
                    self._release_keys_sql, [t.type for t in missing],
                    [t.idempotency_key for t in missing], self.idempotency_ttl_s)
            if not released:
                existing = await conn.fetch(
                    self._existing_sql, [t.type for t in missing],
                    [t.idempotency_key for t in missing])
                found.update({(r["type"], r["idempotency_key"]): _record(r) for r in existing})
            again = [t for t in missing if (t.type, t.idempotency_key) not in found]
            if again:
                rows = await conn.fetch(sql, *args(again))
                created.update({row[0]: _record(row) for row in rows})
        out = []
        for t in tasks:
            if t.id in created:
                out.append(Inserted(created[t.id], True))
            elif t.unique_key is not None and (t.type, t.unique_key) in same:
                out.append(Inserted(same[(t.type, t.unique_key)], False))
            elif (t.type, t.idempotency_key) in found:
                out.append(Inserted(found[(t.type, t.idempotency_key)], False))
            else:
                raise Conflict("tasks.insert", "an idempotency key changed hands meanwhile")
        return out

    async def _unique(
        self, conn: Connection, tasks: list[NewTask], created: dict[uuid.UUID, TaskRecord]
    ) -> dict[tuple[str, str], TaskRecord]:
        """Tasks not inserted whose unique key another holds: release keys past their hold
        and insert again, else find the holder (the unique index decides every race: a
        concurrent insert of the same key waits for the first to commit, then finds it)."""
        same: dict[tuple[str, str], TaskRecord] = {}
        for _ in range(3):
            if not tasks:
                break
            types, keys = [t.type for t in tasks], [t.unique_key for t in tasks]
            if await conn.fetch(self._release_unique_sql, types, keys):
                rows = await conn.fetch(self._insert_sql, *_insert_args(tasks))
                created.update({row[0]: _record(row) for row in rows})
                tasks = [t for t in tasks if t.id not in created]
                types, keys = [t.type for t in tasks], [t.unique_key for t in tasks]
            for row in await conn.fetch(self._existing_unique_sql, types, keys):
                values = list(row)
                key = values.pop()
                same[(row["type"], key)] = _record(values)
            tasks = [t for t in tasks if t.unique_key is not None
                     and (t.type, t.unique_key) not in same]
            if tasks:  # released by a concurrent caller meanwhile: insert again
                rows = await conn.fetch(self._insert_sql, *_insert_args(tasks))
                created.update({row[0]: _record(row) for row in rows})
                tasks = [t for t in tasks if t.id not in created]
        return same

    # -- reads -----------------------------------------------------------------------------

    async def with_keys(self, keys: Sequence[tuple[str, str]]) -> list[TaskRecord]:
        """Tasks named by these (type, idempotency key) pairs, those that exist and whose key
        still holds (within the idempotency TTL)."""
        if not keys:
            return []
        rows = await self._fetch(
            "tasks.with_keys",
            self._existing_sql + " WHERE $3 = 0 OR t.created_at >= now() - $3 * interval '1 second'"
            f" OR t.idempotency_key LIKE '{CRON_KEY_PREFIX}%'",
            [k[0] for k in keys], [k[1] for k in keys], self.idempotency_ttl_s)
        return [_record(r) for r in rows]

    async def get(self, task_id: uuid.UUID) -> TaskRecord | None:
        row = await self._fetchrow(
            "tasks.get", f"SELECT {_COLUMNS} FROM {self.table} AS t WHERE t.id = $1", task_id
        )
        return _record(row) if row else None

    async def list_tasks(
        self,
        *,
        type_: str | None = None,
        status: Status | None = None,
        before: uuid.UUID | None = None,
        limit: int = 50,
    ) -> list[TaskRecord]:
        """Newest first; `before` is the last id of the previous page (keyset pagination).

        By status alone: the newest of each type (each from the partial index of its status),
        merged; the types come from a skip scan of the (type, id) index."""
        t = self.table
        args: list[Any] = []
        clauses: list[str] = []
        if before is not None:
            args.append(before)
            clauses.append(f"t.id < ${len(args)}")
        if status is not None:
            clauses.append(f"t.status = {_literal(status)}")
        if type_ is not None or status is None:
            if type_ is not None:
                args.append(type_)
                clauses.append(f"t.type = ${len(args)}")
            where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
            args.append(limit)
            sql = (f"SELECT {_COLUMNS} FROM {t} AS t {where} "
                   f"ORDER BY t.id DESC LIMIT ${len(args)}")
        else:
            args.append(limit)
            sql = f"""
                WITH RECURSIVE types AS (
                  (SELECT type FROM {t} ORDER BY type LIMIT 1)
                  UNION ALL
                  SELECT (SELECT x.type FROM {t} AS x WHERE x.type > types.type
                          ORDER BY x.type LIMIT 1)
                  FROM types WHERE types.type IS NOT NULL)
                SELECT {_COLUMNS} FROM types CROSS JOIN LATERAL (
                  SELECT * FROM {t} AS t WHERE t.type = types.type AND {' AND '.join(clauses)}
                  ORDER BY t.id DESC LIMIT ${len(args)}) AS t
                ORDER BY t.id DESC LIMIT ${len(args)}"""
        rows = await self._fetch("tasks.list", sql, *args)
        return [_record(r) for r in rows]

    async def counts(self, type_: str) -> QueueCounts:
        """Queued, running and dead counts (exact) and the oldest due queued task, each from
        a partial index that holds only rows of its kind: the cost follows the rows counted
        (live ones; dead ones, bounded by their retention), not the table."""
        t = self.table
        sql = f"""
            SELECT
              (SELECT count(*) FROM {t} WHERE type = $1 AND status = 'queued'),
              (SELECT count(*) FROM {t} WHERE type = $1 AND status = 'running'),
              (SELECT count(*) FROM {t} WHERE type = $1 AND status = 'dead'),
              (SELECT min(run_at) FROM {t} WHERE type = $1 AND status = 'queued'
                                            AND run_at <= now())"""
        row = await self._fetchrow("tasks.counts", sql, type_)
        assert row is not None
        return QueueCounts(row[0], row[1], row[2], row[3])

    # -- retention (the janitor's) ---------------------------------------------------------

    async def types_present(self) -> list[str]:
        """Every task type with rows, by a skip scan of the (type, id) index (one probe per
        type, whatever the table holds)."""
        t = self.table
        rows = await self._fetch("tasks.types_present", f"""
            WITH RECURSIVE types AS (
              (SELECT type FROM {t} ORDER BY type LIMIT 1)
              UNION ALL
              SELECT (SELECT x.type FROM {t} AS x WHERE x.type > types.type
                      ORDER BY x.type LIMIT 1)
              FROM types WHERE types.type IS NOT NULL)
            SELECT type FROM types WHERE type IS NOT NULL""")
        return [r[0] for r in rows]

    async def prune(
        self, type_: str, status: FinishedStatus, older_than_s: float, limit: int, *,
        lock_timeout_s: float = 0.1,
    ) -> Pruned:
        """Delete up to `limit` tasks of `type_` in `status` that finished more than
        `older_than_s` ago (and, by cascade, what belongs to them); oldest ids first.

        One short transaction: rows are found by the finished index within the ids created
        before the cutoff (a task finished before it was created before it), locked with
        SKIP LOCKED (a row a user is retrying right now is left for the next batch), and
        deleted with the status and age checked again. A lock it cannot get within
        `lock_timeout_s` fails the batch (Conflict) rather than making writers queue behind it.
        """
        t = self.table
        literal = _literal(status)
        cutoff = "now() - $2 * interval '1 second'"
        sql = f"""
            WITH doomed AS (
              SELECT t.id FROM {t} AS t
              WHERE t.type = $1 AND t.status = {literal} AND t.id < {_uuid_floor(cutoff)}
                AND t.finished_at < {cutoff}
                AND t.workflow_id IS NULL  -- a workflow is pruned whole
              ORDER BY t.type, t.status, t.id LIMIT $3
              FOR UPDATE SKIP LOCKED)
            DELETE FROM {t} AS t USING doomed
            WHERE t.id = doomed.id AND t.status = {literal} AND t.finished_at < {cutoff}
            RETURNING t.id"""
        async with self._connection("tasks.prune") as conn:
            started = time.perf_counter()
            async with conn.transaction():
                await conn.execute(
                    f"SET LOCAL lock_timeout = {max(1, int(lock_timeout_s * 1000))}")
                rows = await conn.fetch(sql, type_, older_than_s, limit)
            elapsed = time.perf_counter() - started
        return Pruned([r[0] for r in rows], elapsed)

    async def oldest_finished(self, type_: str) -> dict[FinishedStatus, datetime | None]:
        """Per finished status, the finished_at of the oldest kept tasks of `type_` (the
        earliest among the 100 oldest ids: exact unless a task was finished long after it
        was created, as a retried one is), None when there are none."""
        t = self.table
        parts = ", ".join(
            f"(SELECT min(f) FROM (SELECT finished_at AS f FROM {t} WHERE type = $1"
            f" AND status = {_literal(s)} ORDER BY type, status, id LIMIT 100) AS o)"
            for s in FINISHED)
        row = await self._fetchrow("tasks.oldest_finished", f"SELECT {parts}", type_)
        assert row is not None
        return dict(zip(FINISHED, row, strict=True))

    # -- worker transitions ----------------------------------------------------------------

    async def mark_running(
        self, ids: Sequence[uuid.UUID], worker: str, *, via: Pinned | None = None
    ) -> tuple[list[Started], list[NotStarted]]:
        """queued → running for every id that is runnable now; explain the others."""
        async with self._connection("tasks.mark_running", via) as conn:
            rows = await conn.fetch(self._mark_running_sql, list(ids), worker)
            started = [Started(*row) for row in rows]
            if len(started) == len(set(ids)):
                return started, []
            done = {s.id for s in started}
            rest = [i for i in dict.fromkeys(ids) if i not in done]
            found = await conn.fetch(
                f"SELECT id, status, run_at, attempts >= max_attempts, worker, type, payload,"
                f" attempts, max_attempts, trace_context, started_at, priority FROM {self.table}"
                " WHERE id = ANY($1::uuid[])",
                rest,
            )
        by_id = {
            r[0]: NotStarted(
                r[0], r[1], r[2], r[1] == "queued" and r[3],
                Started(r[0], r[5], r[6], r[7], r[8], r[2], r[9], r[10], r[11])
                if r[1] == "running" and r[4] == worker else None,
                priority=r[11],
            )
            for r in found
        }
        return started, [by_id.get(i, NotStarted(i, None, None, False)) for i in rest]

    async def record(
        self, outcomes: Sequence[Outcome], worker: str, *, via: Pinned | None = None
    ) -> list[Recorded]:
        """Record outcomes of attempts this worker still owns; returns those recorded.

        An outcome whose attempt was taken over (requeued by rebalance after this worker looked
        dead) is not recorded: the compare-and-set on (status, worker, attempts) fails. At most
        one outcome per task (each row finds its outcome at its id's first position):
        ValueError otherwise.
        """
        if not outcomes:
            return []
        if len({o.task_id for o in outcomes}) < len(outcomes):
            raise ValueError("two outcomes of one task in one statement")
        rows = await self._fetch(
            "tasks.record",
            self._record_sql,
            [o.task_id for o in outcomes],
            [o.attempt for o in outcomes],
            [o.status for o in outcomes],
            [o.result_json for o in outcomes],
            [o.error for o in outcomes],
            [o.delay_s for o in outcomes],
            worker,
            [o.kind for o in outcomes],
            via=via,
        )
        return [Recorded(*row) for row in rows]

    async def kill(
        self, ids: Iterable[uuid.UUID], reason: str, *, from_: Sequence[Status] = ("queued",)
    ) -> list[uuid.UUID]:
        """→ dead for tasks still in one of `from_`; returns the ids changed."""
        rows = await self._fetch(
            "tasks.kill",
            f"UPDATE {self.table} SET status = 'dead', finished_at = now(), last_error = $2"
            " WHERE id = ANY($1::uuid[]) AND status = ANY($3::text[]) RETURNING id",
            list(ids), reason, list(from_),
        )
        return [r[0] for r in rows]

    async def requeue(self, ids: Iterable[uuid.UUID], worker: str) -> Returned:
        """running on `worker` → queued (or cancelled, if asked), for tasks whose worker is
        gone."""
        rows = await self._fetch(
            "tasks.requeue",
            f"UPDATE {self.table} AS t SET {AFTER_CANCEL},"
            f" attempt_log = t.attempt_log || {WORKER_LOST}"
            " WHERE id = ANY($1::uuid[]) AND status = 'running' AND worker = $2"
            " RETURNING id, status, finished_at",
            list(ids), worker,
        )
        return Returned.of(rows)

    async def hand_back(
        self, attempts: Sequence[tuple[uuid.UUID, int]], worker: str
    ) -> Returned:
        """running on `worker` at the given attempt → queued, due now, the attempt not counted
        (or cancelled, if asked): a stopping worker gives back what it could not finish."""
        if not attempts:
            return Returned([], [])
        rows = await self._fetch(
            "tasks.hand_back",
            f"""UPDATE {self.table} AS t
                SET {AFTER_CANCEL}, attempts = t.attempts - 1, run_at = now(),
                    started_at = NULL
                FROM unnest($1::uuid[], $2::int[]) AS h(id, attempt)
                WHERE t.id = h.id AND t.status = 'running' AND t.worker = $3
                  AND t.attempts = h.attempt AND t.id = ANY($1::uuid[])
                RETURNING t.id, t.status, t.finished_at""",
            [i for i, _ in attempts], [a for _, a in attempts], worker,
        )
        return Returned.of(rows)

    async def defer(
        self, attempts: Sequence[tuple[uuid.UUID, int, float]], worker: str
    ) -> Returned:
        """running on `worker` at the given attempt → queued, due after the given seconds, the
        attempt not counted (or cancelled, if asked): a start its concurrency key's limit did
        not let run (flow control)."""
        if not attempts:
            return Returned([], [])
        rows = await self._fetch(
            "tasks.defer",
            f"""UPDATE {self.table} AS t
                SET {AFTER_CANCEL}, attempts = t.attempts - 1,
                    run_at = now() + h.delay * interval '1 second', started_at = NULL
                FROM unnest($1::uuid[], $2::int[], $3::float8[]) AS h(id, attempt, delay)
                WHERE t.id = h.id AND t.status = 'running' AND t.worker = $4
                  AND t.attempts = h.attempt AND t.id = ANY($1::uuid[])
                RETURNING t.id, t.status, t.finished_at""",
            [i for i, _, _ in attempts], [a for _, a, _ in attempts],
            [d for _, _, d in attempts], worker,
        )
        return Returned.of(rows)

    async def running_on(self, ids: Iterable[uuid.UUID], worker: str) -> set[uuid.UUID]:
        """Which of `ids` are running on `worker` (whose lease, if it is alive, it holds)."""
        rows = await self._fetch(
            "tasks.running_on",
            f"SELECT id FROM {self.table} WHERE id = ANY($1::uuid[]) AND status = 'running'"
            " AND worker = $2",
            list(ids), worker,
        )
        return {r[0] for r in rows}

    # -- user actions ----------------------------------------------------------------------

    async def cancel(self, task_id: uuid.UUID) -> TaskRecord | None:
        """queued → cancelled; None if the task is not queued (or does not exist)."""
        row = await self._fetchrow(
            "tasks.cancel",
            f"UPDATE {self.table} AS t SET status = 'cancelled', finished_at = now()"
            f" WHERE t.id = $1 AND t.status = 'queued' RETURNING {_COLUMNS}",
            task_id,
        )
        return _record(row) if row else None

    async def request_cancel(self, task_id: uuid.UUID) -> TaskRecord | None:
        """waiting | queued → cancelled, or running → running with `cancel_requested` (its
        worker stops it); None if the task is none of them (or does not exist)."""
        row = await self._fetchrow(
            "tasks.request_cancel",
            f"UPDATE {self.table} AS t SET cancel_requested = true,"
            " status = CASE WHEN t.status = 'running' THEN t.status ELSE 'cancelled' END,"
            " finished_at = CASE WHEN t.status = 'running' THEN t.finished_at ELSE now() END"
            " WHERE t.id = $1 AND t.status IN ('waiting', 'queued', 'running')"
            f" RETURNING {_COLUMNS}",
            task_id,
        )
        return _record(row) if row else None

    async def write_progress(
        self, reports: Sequence[tuple[uuid.UUID, int, str]], worker: str
    ) -> int:
        """Store (task id, attempt, progress JSON) for attempts still running on `worker`, in
        one statement; returns how many rows took it."""
        if not reports:
            return 0
        rows = await self._fetch(
            "tasks.write_progress",
            f"""UPDATE {self.table} AS t SET progress = p.progress::jsonb
                FROM unnest($1::uuid[], $2::int[], $3::text[]) AS p(id, attempt, progress)
                WHERE t.id = p.id AND t.status = 'running' AND t.worker = $4
                  AND t.attempts = p.attempt AND t.id = ANY($1::uuid[])
                RETURNING t.id""",
            [r[0] for r in reports], [r[1] for r in reports], [r[2] for r in reports], worker,
        )
        return len(rows)

    async def relabel_lost(self, attempts: Sequence[tuple[uuid.UUID, int]], worker: str) -> None:
        """The attempts `worker` ran that were re-queued as `worker_lost` while it was alive
        (stalled past the TTL): their log entries say `lease_lost`."""
        if not attempts:
            return
        await self._fetch(
            "tasks.relabel_lost",
            f"""UPDATE {self.table} AS t SET attempt_log = (
                    SELECT jsonb_agg(CASE WHEN e->>'worker' = $3
                                           AND (e->>'number')::int = h.attempt
                                           AND e->>'outcome' = 'worker_lost'
                                      THEN jsonb_set(e, '{{outcome}}', '"lease_lost"')
                                      ELSE e END ORDER BY i)
                    FROM jsonb_array_elements(t.attempt_log) WITH ORDINALITY AS x(e, i))
                FROM unnest($1::uuid[], $2::int[]) AS h(id, attempt)
                WHERE t.id = h.id AND jsonb_array_length(t.attempt_log) > 0
                  AND t.id = ANY($1::uuid[])""",
            [i for i, _ in attempts], [a for _, a in attempts], worker,
        )

    async def retry(self, task_id: uuid.UUID) -> TaskRecord | None:
        """dead | cancelled → queued (waiting, if an upstream is unfinished) with a fresh set
        of attempts; None if not allowed."""
        row = await self._fetchrow(
            "tasks.retry",
            # One with an upstream still unfinished waits for it again (migration 0007).
            f"UPDATE {self.table} AS t SET attempts = 0, run_at = now(),"
            " status = CASE WHEN t.deps_left > 0 THEN 'waiting' ELSE 'queued' END,"
            " started_at = NULL, finished_at = NULL, result = NULL, cancel_requested = false,"
            " progress = NULL"
            f" WHERE t.id = $1 AND t.status IN ('dead', 'cancelled') RETURNING {_COLUMNS}",
            task_id,
        )
        return _record(row) if row else None

    # -- relay -----------------------------------------------------------------------------

    async def overdue(
        self, type_: str, older_than_s: float, after: tuple[datetime, uuid.UUID] | None,
        limit: int,
    ) -> list[tuple[datetime, uuid.UUID, str | None]]:
        """(run_at, id, priority) of queued tasks of `type_` due more than `older_than_s` ago,
        oldest first, keyset (`after`: the last run_at and id)."""
        sql = (f"SELECT run_at, id, priority FROM {self.table}"
               " WHERE status = 'queued' AND type = $1"
               " AND run_at < now() - $2 * interval '1 second'")
        args: list[Any] = [type_, older_than_s]
        if after is not None:
            sql += " AND (run_at, id) > ($3, $4)"
            args += list(after)
        sql += f" ORDER BY run_at, id LIMIT ${len(args) + 1}"
        rows = await self._fetch("tasks.overdue", sql, *args, limit)
        return [(r[0], r[1], r[2]) for r in rows]

    async def priorities(self, ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, str | None]:
        """The stored priority of each of `ids` that exists (None: default)."""
        rows = await self._fetch("tasks.priorities",
                                 f"SELECT id, priority FROM {self.table}"
                                 " WHERE id = ANY($1::uuid[])", list(ids))
        return {r[0]: r[1] for r in rows}

    async def running_since(self, older_than_s: float
                            ) -> list[tuple[uuid.UUID, str, str, str | None]]:
        """(id, type, worker, priority) of tasks running for more than `older_than_s`."""
        rows = await self._fetch(
            "tasks.running_since",
            f"SELECT id, type, worker, priority FROM {self.table} WHERE status = 'running'"
            " AND started_at < now() - $1 * interval '1 second'",
            older_than_s,
        )
        return [(r[0], r[1], r[2], r[3]) for r in rows]


# For the other stores that read task rows (store/workflows.py): the record's columns, from
# `{schema}.tasks AS t`, and the record of such a row.
RECORD_COLUMNS = _COLUMNS
record_of = _record
