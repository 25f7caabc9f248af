"""The dashboard's reads and bulk actions on the tasks table: filtered keyset pages, the
overview's per-minute figures, stale workers, and retry / cancel / delete of a selection or of
everything a filter matches, in bounded batches.

Every query names a task type (a filter without one runs once per type, merged), so each is a
range of one of the (type, ...) indexes: `tasks_type_id`, or the partial `tasks_live` /
`tasks_finished` when a status is given (named as a literal, see store/tasks.py). Ids are
UUIDv7, so a time window is a range of ids. A payload-field filter reads the heap, so it needs
a type and a window and examines at most `scan` rows per page (the page says where it stopped).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import orjson

from conveyor.store.pool import Pool, borrowed
from conveyor.store.tasks import (
    _COLUMNS,
    FINISHED,
    STATUSES,
    Status,
    TaskRecord,
    _literal,
    _record,
)
from conveyor.store.workers import WorkerRow

Action = Literal["retry", "cancel", "delete"]
ACTIONS: tuple[Action, ...] = ("retry", "cancel", "delete")
# The statuses each action applies to; the others are left as they are.
ACTION_FROM: dict[Action, tuple[Status, ...]] = {
    "retry": ("dead", "cancelled"),
    "cancel": ("queued", "running"),
    "delete": FINISHED,
}


# The overview's hour, read from the record, counts tasks by when they finished, among those
# created up to this long before the hour (an id range of the index, so the read costs about
# two hours of tasks); one that took longer is counted only from the events.
FINISH_LAG = timedelta(hours=1)
_MAX_MILLIS = (1 << 48) - 1  # a UUIDv7's time field


def _millis(moment: datetime) -> int:
    """`moment` in Unix milliseconds, clamped to what a UUIDv7 can hold."""
    return min(max(int(moment.timestamp() * 1000), 0), _MAX_MILLIS)


def id_floor(moment: datetime) -> uuid.UUID:
    """The smallest UUIDv7 of `moment`'s millisecond: every task created before it has a
    smaller id."""
    return uuid.UUID(int=_millis(moment) << 80)


def id_ceiling(moment: datetime) -> uuid.UUID:
    """The largest UUIDv7 of `moment`'s millisecond: every task created after it has a
    larger id."""
    return uuid.UUID(int=(_millis(moment) << 80) | ((1 << 80) - 1))


@dataclass(frozen=True, slots=True)
class TaskFilter:
    """What the task list shows. `field` is a payload path and its value as JSON text."""

    type: str | None = None
    status: Status | None = None
    since: datetime | None = None
    until: datetime | None = None
    key: str | None = None
    field: tuple[tuple[str, ...], str] | None = None
    id: uuid.UUID | None = None  # one task
    upto: uuid.UUID | None = None  # the largest id (a confirmed action's bound)


@dataclass(frozen=True, slots=True)
class Page:
    tasks: list[TaskRecord]
    next_cursor: uuid.UUID | None  # the id to continue below (None: no more)
    scanned: int | None = None  # with a payload filter: rows examined for this page


@dataclass(frozen=True, slots=True)
class Count:
    """How many tasks a filter matches; with a payload field, among `scanned` examined, and
    the id to go on below when there may be more (None: no more)."""

    n: int
    scanned: int | None = None
    next_cursor: uuid.UUID | None = None


@dataclass(frozen=True, slots=True)
class Walk:
    """Ids a filter matches, newest first, and the id to go on below (None: no more)."""

    ids: list[uuid.UUID]
    next_cursor: uuid.UUID | None
    scanned: int | None = None  # with a payload field: tasks examined


@dataclass(frozen=True, slots=True)
class Minute:
    at: datetime
    succeeded: int
    dead: int


@dataclass(frozen=True, slots=True)
class WorkerBeat(WorkerRow):
    """A worker row, stale ones too, with its beat's age."""

    age_s: float  # since its last beat, by Postgres's clock


class Dashboard:
    """The dashboard's SQL on the tasks and workers tables of one schema."""

    def __init__(self, pool: Pool, schema: str, *, acquire_timeout_s: float = 5.0) -> None:
        self.pool = pool
        self.acquire_timeout_s = acquire_timeout_s
        self.table = f"{schema}.tasks"
        self.workers = f"{schema}.workers"

    async def _fetch(self, op: str, sql: str, *args: Any) -> list[Any]:
        async with borrowed(self.pool, self.acquire_timeout_s, op) as conn:
            return await conn.fetch(sql, *args)

    async def _fetch_custom(self, op: str, sql: str, *args: Any) -> list[Any]:
        """`_fetch`, planned for these arguments (no generic plan, no JIT)."""
        async with borrowed(self.pool, self.acquire_timeout_s, op) as conn, \
                conn.transaction(readonly=True):
            await conn.execute("SET LOCAL plan_cache_mode = force_custom_plan;"
                               " SET LOCAL jit = off")
            return await conn.fetch(sql, *args)

    # -- the task list ---------------------------------------------------------------------

    def _clauses(self, f: TaskFilter, args: list[Any], *, ranged: bool = False) -> list[str]:
        """WHERE clauses (on `t`, its type given as `types.type`) for `f`. `ranged` writes
        the type as a range of one value: it then stays in the page's order (type, status,
        id), which only the (type, ...) indexes hold, so the planner walks the one
        of the filter instead of the primary key past newer rows of other types and
        statuses (an equality would make the type a constant, and `id` alone the order)."""
        ranged = ranged and f.key is None  # a key: the idempotency index, by equality
        clauses = [("t.type >= types.type AND t.type <= types.type" if ranged
                    else "t.type = types.type")]
        if f.status is not None:
            clauses.append(f"t.status = {_literal(f.status)}")
        if f.since is not None:
            args.append(id_floor(f.since))
            clauses.append(f"t.id >= ${len(args)}")
        if f.until is not None:
            args.append(id_floor(f.until))
            clauses.append(f"t.id < ${len(args)}")
        if f.key is not None:
            args.append(f.key)
            clauses.append(f"t.idempotency_key = ${len(args)}")
        if f.id is not None:
            args.append(f.id)
            clauses.append(f"t.id = ${len(args)}")
        if f.upto is not None:
            args.append(f.upto)
            clauses.append(f"t.id <= ${len(args)}")
        return clauses

    def _field_clause(self, f: TaskFilter, args: list[Any]) -> str:
        assert f.field is not None
        path, value = f.field
        args.append(list(path))
        args.append(orjson.loads(value))  # the pool's jsonb codec encodes it
        return f"t.payload #> ${len(args) - 1}::text[] = ${len(args)}::jsonb"

    async def page(self, types: Sequence[str], f: TaskFilter, *, before: uuid.UUID | None,
                   limit: int, scan: int = 20_000) -> Page:
        """One page of `f`'s tasks, newest first, below `before`. With a payload field (one
        type only), at most `scan` rows are examined: `next_cursor` is then where to go on."""
        names = [f.type] if f.type is not None else list(types)
        if not names:
            return Page([], None)
        args: list[Any] = [names]
        clauses = self._clauses(f, args, ranged=True)
        if before is not None:
            args.append(before)
            clauses.append(f"t.id < ${len(args)}")
        where = " AND ".join(clauses)
        t = self.table
        order = ("t.id DESC" if f.key is not None
                 else "t.type DESC, t.status DESC, t.id DESC" if f.status
                 else "t.type DESC, t.id DESC")
        if f.field is None:
            args.append(limit + 1)
            rows = await self._fetch("dashboard.page", f"""
                SELECT {_COLUMNS} FROM unnest($1::text[]) AS types(type) CROSS JOIN LATERAL (
                  SELECT * FROM {t} AS t WHERE {where} ORDER BY {order} LIMIT ${len(args)}
                ) AS t ORDER BY t.id DESC LIMIT ${len(args)}""", *args)
            records = [_record(r) for r in rows]
            more = len(records) > limit
            records = records[:limit]
            return Page(records, records[-1].id if more else None)
        args.append(scan)
        scan_arg = len(args)

        def inner(columns: str) -> str:
            return (f"SELECT t.{columns} FROM unnest($1::text[]) AS types(type) CROSS JOIN"
                    f" LATERAL (SELECT t.{columns} FROM {t} AS t WHERE {where}"
                    f" ORDER BY {order} LIMIT ${scan_arg}) AS t")

        bounds_args = list(args)
        field = self._field_clause(f, args)
        args.append(limit)
        async with borrowed(self.pool, self.acquire_timeout_s, "dashboard.search") as conn:
            rows = await conn.fetch(
                f"SELECT {_COLUMNS} FROM ({inner('*')}) AS t WHERE {field}"
                f" ORDER BY t.id DESC LIMIT ${len(args)}", *args)
            bounds = await conn.fetchrow(
                f"SELECT count(*), (array_agg(t.id ORDER BY t.id))[1] FROM ({inner('id')}) AS t",
                *bounds_args)
        assert bounds is not None
        scanned, lowest = int(bounds[0]), bounds[1]
        records = [_record(r) for r in rows]
        if len(records) == limit:
            return Page(records, records[-1].id, scanned)
        return Page(records, lowest if scanned == scan else None, scanned)

    def _sources(self, f: TaskFilter, statuses: Sequence[Status], args: list[Any],
                 before: uuid.UUID | None, select: str, limit_arg: int) -> list[str]:
        """One `types CROSS JOIN LATERAL` per status (a literal each, so each walks its
        partial (type, status, id) index newest first, as page() does), selecting `select`
        from up to `$limit_arg` rows of each type; to be merged with UNION ALL. `statuses`:
        those of an action (narrowed by the filter's own); a running task already asked to
        cancel is not among them (an action would not change it)."""
        wanted: list[Status | None]
        if statuses:
            wanted = [s for s in statuses if f.status is None or s == f.status]
        else:
            wanted = [f.status]
        out = []
        for status in wanted:
            clauses = self._clauses(replace(f, status=status), args, ranged=True)
            if statuses and status == "running":
                clauses.append("NOT t.cancel_requested")
            if before is not None:
                args.append(before)
                clauses.append(f"t.id < ${len(args)}")
            order = ("t.id DESC" if f.key is not None
                     else "t.type DESC, t.status DESC, t.id DESC" if status
                     else "t.type DESC, t.id DESC")
            out.append(f"SELECT {select} FROM unnest($1::text[]) AS types(type) CROSS JOIN"
                       f" LATERAL (SELECT {select} FROM {self.table} AS t"
                       f" WHERE {' AND '.join(clauses)} ORDER BY {order}"
                       f" LIMIT ${limit_arg}) AS t")
        return out

    async def _search(self, names: list[str], f: TaskFilter, statuses: Sequence[Status], *,
                      before: uuid.UUID | None, limit: int, scan: int) -> Walk:
        """Up to `limit` ids matching `f`'s payload field among the newest `scan` tasks of
        the rest of `f` below `before` (one statement)."""
        args: list[Any] = [names]
        field = self._field_clause(f, args)
        args.append(scan)
        scan_arg = len(args)
        sources = self._sources(f, statuses, args, before, "t.id", scan_arg)
        if not sources:
            return Walk([], None, 0)
        args.append(limit)
        # the newest `scan` ids from the indexes alone, then the payload of those only (a
        # lookup by id each: the LIMIT keeps the planner from joining the whole table). A
        # custom plan each time: a generic one (the driver prepares statements) does not
        # know the bounds and can scan the table instead (seconds on 10M rows).
        row = (await self._fetch_custom("dashboard.search_ids", f"""
            WITH e AS (SELECT x.id FROM ({' UNION ALL '.join(sources)}) AS x
                       ORDER BY x.id DESC LIMIT ${scan_arg}),
                 h AS (SELECT e.id FROM e CROSS JOIN LATERAL (
                         SELECT t.payload FROM {self.table} AS t WHERE t.id = e.id LIMIT 1
                       ) AS t WHERE {field} ORDER BY e.id DESC LIMIT ${len(args)})
            SELECT (SELECT coalesce(array_agg(h.id ORDER BY h.id DESC), '{{}}') FROM h),
                   (SELECT count(*) FROM e),
                   (SELECT (array_agg(e.id ORDER BY e.id))[1] FROM e),
                   (SELECT count(*) FROM e WHERE e.id >= (SELECT h.id FROM h
                                                           ORDER BY h.id LIMIT 1))""",
                                 *args))[0]
        ids, examined, lowest, to_last = list(row[0]), int(row[1]), row[2], int(row[3])
        if len(ids) == limit:  # examined down to the last one found
            return Walk(ids, ids[-1], to_last)
        return Walk(ids, lowest if examined == scan else None, examined)

    async def count(self, types: Sequence[str], f: TaskFilter, *, cap: int,
                    statuses: Sequence[Status] = (), scan: int = 20_000) -> Count:
        """How many tasks `f` matches (of `statuses`, when given), counted up to `cap`. With a
        payload field, among the newest `scan` tasks of the rest of the filter: the count
        then says how many it examined and where to go on."""
        names = [f.type] if f.type is not None else list(types)
        if not names:
            return Count(0)
        if f.field is not None:
            walk = await self._search(names, f, statuses, before=None, limit=cap, scan=scan)
            return Count(len(walk.ids), walk.scanned, walk.next_cursor)
        args: list[Any] = [names]
        args.append(cap)
        sources = self._sources(f, statuses, args, None, "1", 2)
        if not sources:
            return Count(0)
        rows = await self._fetch("dashboard.count", f"""
            SELECT count(*) FROM ({' UNION ALL '.join(sources)} LIMIT $2) AS c""", *args)
        return Count(int(rows[0][0]))

    async def matching_ids(self, types: Sequence[str], f: TaskFilter, statuses: Sequence[Status],
                           *, before: uuid.UUID | None, limit: int, scan: int = 20_000) -> Walk:
        """Up to `limit` ids `f` matches in `statuses`, newest first, below `before`, and
        where to go on. With a payload field, among the newest `scan` tasks of the rest of
        the filter (`scanned`: how many of them it examined)."""
        names = [f.type] if f.type is not None else list(types)
        if not names:
            return Walk([], None)
        if f.field is not None:
            return await self._search(names, f, statuses, before=before, limit=limit,
                                      scan=scan)
        args: list[Any] = [names, limit]
        sources = self._sources(f, statuses, args, before, "t.id", 2)
        if not sources:
            return Walk([], None)
        rows = await self._fetch("dashboard.matching", f"""
            SELECT x.id FROM ({' UNION ALL '.join(sources)}) AS x
            ORDER BY x.id DESC LIMIT $2""", *args)
        ids = [r[0] for r in rows]
        return Walk(ids, ids[-1] if len(ids) == limit else None)

    # -- bulk actions (one statement per batch of ids) ----------------------------------------

    async def retry(self, ids: Sequence[uuid.UUID]) -> list[TaskRecord]:
        """dead | cancelled → queued with fresh attempts, as TaskStore.retry does, for many;
        the rows changed (to publish)."""
        rows = await self._fetch(
            "dashboard.retry",
            f"UPDATE {self.table} AS t SET status = 'queued', attempts = 0, run_at = now(),"
            " started_at = NULL, finished_at = NULL, result = NULL, cancel_requested = false,"
            " progress = NULL"
            f" WHERE t.id = ANY($1::uuid[]) AND t.status IN ('dead', 'cancelled')"
            f" RETURNING {_COLUMNS}", list(ids))
        return [_record(r) for r in rows]

    async def cancel(self, ids: Sequence[uuid.UUID]) -> list[TaskRecord]:
        """queued → cancelled, running → cancel requested, as TaskStore.request_cancel does,
        for many; the rows changed (to announce)."""
        rows = await self._fetch(
            "dashboard.cancel",
            f"UPDATE {self.table} AS t SET cancel_requested = true,"
            " status = CASE WHEN t.status = 'queued' THEN 'cancelled' ELSE t.status END,"
            " finished_at = CASE WHEN t.status = 'queued' THEN now() ELSE t.finished_at END"
            " WHERE t.id = ANY($1::uuid[]) AND t.status IN ('queued', 'running')"
            "   AND NOT (t.status = 'running' AND t.cancel_requested)"
            f" RETURNING {_COLUMNS}", list(ids))
        return [_record(r) for r in rows]

    async def delete(self, ids: Sequence[uuid.UUID]) -> list[uuid.UUID]:
        """Delete finished tasks (succeeded, dead, cancelled) among `ids`; live ones stay
        (cancel them first). The ids deleted."""
        finished = ", ".join(_literal(s) for s in FINISHED)
        rows = await self._fetch(
            "dashboard.delete",
            f"DELETE FROM {self.table} AS t WHERE t.id = ANY($1::uuid[])"
            f" AND t.status IN ({finished}) RETURNING t.id", list(ids))
        return [r[0] for r in rows]

    # -- the overview ----------------------------------------------------------------------

    async def minutes(self, type_: str, minutes: int = 60, *,
                      until: datetime | None = None) -> list[Minute]:
        """Succeeded and dead per minute (by finished_at) over the last `minutes` (those
        before `until`, when given): per status, a range of `tasks_finished` (type, status,
        id) INCLUDE (finished_at) over the tasks created up to FINISH_LAG before the span
        (one that took longer from creation to its end is not counted). Its cost follows
        the tasks finished in that range: the dashboard reads it once per process
        (ui/throughput.py)."""
        since = datetime.now(UTC) - timedelta(minutes=minutes)
        end = until or datetime.now(UTC) + timedelta(days=1)
        t = self.table

        def part(status: str) -> str:
            return (f"SELECT date_trunc('minute', t.finished_at) AS m, t.status"
                    f" FROM {t} AS t WHERE t.type = $1 AND t.status = {status}"
                    " AND t.id >= $2 AND t.finished_at >= $3 AND t.finished_at < $4")

        rows = await self._fetch("dashboard.minutes", f"""
            SELECT x.m, count(*) FILTER (WHERE x.status = 'succeeded'),
                   count(*) FILTER (WHERE x.status = 'dead')
            FROM ({part("'succeeded'")} UNION ALL {part("'dead'")}) AS x
            GROUP BY 1 ORDER BY 1""", type_, id_floor(since - FINISH_LAG), since, end)
        return [Minute(r[0], int(r[1]), int(r[2])) for r in rows]

    async def latency(self, type_: str, sample: int = 200) -> list[float]:
        """Seconds from due (run_at) to start of the newest `sample` started tasks of a type,
        sorted."""
        rows = await self._fetch("dashboard.latency", f"""
            SELECT extract(epoch FROM (s.started_at - s.run_at)) FROM (
              SELECT t.started_at, t.run_at FROM {self.table} AS t
              WHERE t.type = $1 ORDER BY t.id DESC LIMIT $2) AS s
            WHERE s.started_at IS NOT NULL ORDER BY 1""", type_, sample)
        return [max(0.0, float(r[0])) for r in rows]

    # -- workers ---------------------------------------------------------------------------

    async def worker_beats(self) -> list[WorkerBeat]:
        """Every worker row (live and stale; the janitor prunes long-stale ones), with its
        running count and the age of its beat."""
        rows = await self._fetch("dashboard.workers", f"""
            SELECT w.id, w.host, w.pid, w.types, w.concurrency, w.started_at, w.beat_at,
                   w.info,
                   (SELECT count(*) FROM {self.table} AS t
                    WHERE t.status = 'running' AND t.worker = w.id),
                   extract(epoch FROM now() - w.beat_at)
            FROM {self.workers} AS w ORDER BY w.beat_at DESC, w.id LIMIT 500""")
        return [WorkerBeat(id=r[0], host=r[1], pid=r[2], types=list(r[3]), concurrency=r[4],
                           started_at=r[5], beat_at=r[6], info=_info(r[7]), running=int(r[8]),
                           age_s=float(r[9])) for r in rows]


def _info(value: Any) -> dict[str, Any]:
    if isinstance(value, str | bytes):
        loaded: dict[str, Any] = orjson.loads(value)
        return loaded
    return dict(value or {})


__all__ = ["ACTIONS", "ACTION_FROM", "FINISH_LAG", "STATUSES", "Action", "Count", "Dashboard",
           "Minute", "Page", "TaskFilter", "Walk", "WorkerBeat", "id_ceiling", "id_floor"]
