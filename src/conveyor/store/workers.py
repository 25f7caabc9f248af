"""Worker liveness, the one owner of "who is alive": each worker's row in the `workers` table,
its beat, its lease on the tasks it runs, and the judgement that a worker is dead.  [heartbeat]

Liveness lives in Postgres, not Redis, so that losing Redis's data (a restart without
persistence, `FLUSHALL`) cannot make a live worker look dead. A worker writes its row before it
reads its first message and refreshes it every heartbeat interval; the same statement answers
which of the tasks it runs are still its own (the lease check): a task re-queued while the
worker was stalled comes back missing, and the worker stops working on it.

A worker is judged dead only on evidence its judge saw itself: its beat older than the TTL, seen
again and again by the same `Liveness` over a whole confirmation window. A beat that is stale
only because Postgres was down a while (nobody could beat) is refreshed within that window once
it is back, so a Postgres restart does not make every worker look dead either.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from conveyor.store.pool import Pool, acquire, translate


@dataclass(frozen=True, slots=True)
class WorkerRow:
    """A worker whose beat is within the TTL, as GET /v1/workers shows it."""

    id: str
    host: str
    pid: int
    types: list[str]
    concurrency: int
    started_at: datetime
    beat_at: datetime
    info: dict[str, Any]
    running: int  # tasks running on it now, per the task record


class WorkerStore:
    """All SQL on the workers table of one schema."""

    def __init__(self, pool: Pool, schema: str, *, acquire_timeout_s: float = 5.0) -> None:
        self.pool = pool
        self.acquire_timeout_s = acquire_timeout_s
        self.table = f"{schema}.workers"
        self.tasks = f"{schema}.tasks"
        # $1 id, $2 host, $3 pid, $4 types, $5 concurrency, $6 info; $7/$8 the (task id,
        # attempt) pairs the worker runs. Writes the beat; returns the ids still running on
        # this worker at that attempt (a data-modifying WITH runs whatever the SELECT reads).
        self._beat_sql = f"""
            WITH beat AS (
              INSERT INTO {self.table} AS w (id, host, pid, types, concurrency, info)
              VALUES ($1, $2, $3, $4::text[], $5, $6::jsonb)
              ON CONFLICT (id) DO UPDATE SET beat_at = now(), info = EXCLUDED.info
              RETURNING 1)
            SELECT t.id FROM {self.tasks} AS t
            JOIN unnest($7::uuid[], $8::int[]) AS h(id, attempt) ON t.id = h.id
            WHERE t.status = 'running' AND t.worker = $1 AND t.attempts = h.attempt
              AND t.id = ANY($7::uuid[])"""

    async def _fetch(self, op: str, sql: str, *args: Any) -> list[Any]:
        with translate(op):
            conn = await acquire(self.pool, self.acquire_timeout_s, op)
            try:
                return await conn.fetch(sql, *args)
            finally:
                await self.pool.release(conn)

    async def beat(
        self, worker_id: str, *, host: str, pid: int, types: Sequence[str], concurrency: int,
        info: dict[str, Any], running: Sequence[tuple[uuid.UUID, int]],
    ) -> set[uuid.UUID]:
        """Refresh the worker's row; returns which of `running` (task id, attempt) it still
        owns. The rest were taken from it (re-queued while it looked dead)."""
        rows = await self._fetch(
            "workers.beat", self._beat_sql, worker_id, host, pid, list(types), concurrency,
            info, [t for t, _ in running], [a for _, a in running],
        )
        return {r[0] for r in rows}

    async def remove(self, worker_id: str) -> None:
        """A clean stop: the worker is gone at once, not after its TTL."""
        await self._fetch("workers.remove", f"DELETE FROM {self.table} WHERE id = $1",
                          worker_id)

    async def fresh(self, worker_ids: Iterable[str], ttl_s: float) -> set[str]:
        """The subset of `worker_ids` whose beat is within `ttl_s` (by Postgres's clock)."""
        ids = sorted(set(worker_ids))
        if not ids:
            return set()
        rows = await self._fetch(
            "workers.fresh",
            f"SELECT id FROM {self.table} WHERE id = ANY($1::text[])"
            " AND beat_at > now() - $2 * interval '1 second'",
            ids, ttl_s,
        )
        return {r[0] for r in rows}

    async def live(self, ttl_s: float) -> list[WorkerRow]:
        """Workers whose beat is within `ttl_s`, with the count of tasks running on each."""
        rows = await self._fetch(
            "workers.live",
            f"""SELECT w.id, w.host, w.pid, w.types, w.concurrency, w.started_at, w.beat_at,
                       w.info,
                       (SELECT count(*) FROM {self.tasks} AS t
                        WHERE t.status = 'running' AND t.worker = w.id)
                FROM {self.table} AS w
                WHERE w.beat_at > now() - $1 * interval '1 second' ORDER BY w.id""",
            ttl_s,
        )
        return [WorkerRow(*r) for r in rows]

    async def prune(self, older_than_s: float) -> int:
        """Delete rows whose beat is older than `older_than_s`; returns how many. (A missing
        row reads as a stale one, so pruning never changes a judgement.)"""
        rows = await self._fetch(
            "workers.prune",
            f"DELETE FROM {self.table} WHERE beat_at < now() - $1 * interval '1 second'"
            " RETURNING id",
            older_than_s,
        )
        return len(rows)


def confirmation_s(heartbeat_interval_s: float) -> float:
    """How long a stale beat must be watched before its worker is judged dead: a beat period,
    plus a margin for a worker whose beats failed (Postgres was down) to get one through once
    Postgres is back (it retries every second)."""
    return heartbeat_interval_s + 1.0


class Liveness:
    """Judges workers dead: stale beat (older than `ttl_s`, or no row) observed by this judge
    continuously for `confirm_s`. Share one per process between the loops that judge."""

    def __init__(
        self, workers: WorkerStore, *, ttl_s: float, confirm_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.workers = workers
        self.ttl_s = ttl_s
        self.confirm_s = confirm_s
        self.clock = clock
        # worker id → (first seen stale, last seen stale), by `clock`. An observation gap
        # longer than the window restarts the count: the staleness must be watched throughout.
        self._stale: dict[str, tuple[float, float]] = {}

    async def dead(self, worker_ids: Iterable[str]) -> set[str]:
        """The subset of `worker_ids` judged dead now."""
        ids = {w for w in worker_ids if w}
        if not ids:
            return set()
        fresh = await self.workers.fresh(ids, self.ttl_s)
        now = self.clock()
        gap = max(self.confirm_s, self.ttl_s)
        dead = set()
        for worker in ids:
            if worker in fresh:
                self._stale.pop(worker, None)
                continue
            first, last = self._stale.get(worker, (now, now))
            if now - last > gap:
                first = now
            self._stale[worker] = (first, now)
            if now - first >= self.confirm_s:
                dead.add(worker)
        for worker, (_, last) in list(self._stale.items()):
            if now - last > 10 * gap:  # no longer asked about: forget it
                del self._stale[worker]
        return dead
