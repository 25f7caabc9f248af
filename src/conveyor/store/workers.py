"""Worker liveness, the one owner of "who is alive": each worker's row in the `workers` table,
its beat, its lease on the tasks it runs, and the judgement that a worker is dead.  [heartbeat]

Liveness lives in Postgres, not Redis, so that losing Redis's data (a restart without
persistence, `FLUSHALL`) cannot make a live worker look dead. A worker writes its row before it
reads its first message, refreshes it every heartbeat interval and deletes it when it stops
cleanly; the same statement answers which of the tasks it runs are still its own (the lease
check: a task re-queued while the worker was stalled comes back missing, and the worker stops
working on it), and gives back the tasks it runs per Postgres but has lost track of.

A worker with no row is dead. One with a row is judged dead only on evidence its judge saw
itself: its beat older than the TTL, seen again and again by the same `Liveness` over a whole
confirmation window. A beat that is stale only because Postgres was down a while (nobody could
beat) is refreshed within that window once it is back, so a Postgres restart does not make
every worker look dead either.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from conveyor.store.pool import Pool, acquire, translate
from conveyor.store.tasks import AFTER_CANCEL, WORKER_LOST


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


@dataclass(slots=True)
class Beat:
    """What one beat learned: its time (by Postgres's clock), the (task id, attempt) pairs
    still this worker's, and the tasks it had lost track of, now queued again."""

    at: datetime
    owned: set[tuple[uuid.UUID, int]] = field(default_factory=set)
    # Owned attempts whose cancel was requested (a backstop for a missed cancel message).
    cancel_requested: set[tuple[uuid.UUID, int]] = field(default_factory=set)
    forgotten: list[uuid.UUID] = field(default_factory=list)


class WorkerStore:
    """All SQL on the workers table of one schema."""

    def __init__(self, pool: Pool, schema: str, *, acquire_timeout_s: float = 5.0) -> None:
        self.pool = pool
        self.acquire_timeout_s = acquire_timeout_s
        self.table = f"{schema}.workers"
        self.tasks = f"{schema}.tasks"
        # $1 id, $2 host, $3 pid, $4 types, $5 concurrency, $6 info; $7/$8 the (task id,
        # attempt) pairs the worker runs; $9 every task id it holds a message of; $10 the
        # time of its previous beat (None at the first). Writes the beat (a data-modifying
        # WITH runs whatever the SELECT reads) and returns, as (id, attempts, owned):
        # - owned: the pairs asked about that are still running here at that attempt;
        # - not owned: tasks running here that the worker holds no message of and that started
        #   before its previous beat (so a start committed while this beat was in flight is
        #   not among them): it lost track of them; they go back to queued, as a requeue does.
        self._beat_sql = f"""
            WITH beat AS (
              INSERT INTO {self.table} AS w (id, host, pid, types, concurrency, info)
              VALUES ($1, $2, $3, $4::text[], $5, $6::jsonb)
              ON CONFLICT (id) DO UPDATE SET beat_at = now(), info = EXCLUDED.info
              RETURNING beat_at),
            forgotten AS (
              UPDATE {self.tasks} AS t SET {AFTER_CANCEL},
                  attempt_log = t.attempt_log || {WORKER_LOST}
              WHERE t.status = 'running' AND t.worker = $1 AND t.started_at < $10
                AND NOT (t.id = ANY($9::uuid[]))
              RETURNING t.id, t.attempts)
            SELECT 'beat', NULL::uuid, NULL::int, b.beat_at, false FROM beat AS b
            UNION ALL
            SELECT 'owned', t.id, t.attempts, NULL, t.cancel_requested FROM {self.tasks} AS t
            JOIN unnest($7::uuid[], $8::int[]) AS h(id, attempt) ON t.id = h.id
            WHERE t.status = 'running' AND t.worker = $1 AND t.attempts = h.attempt
              AND t.id = ANY($7::uuid[])
            UNION ALL
            SELECT 'forgotten', f.id, f.attempts, NULL, false FROM forgotten AS f"""

    async def _fetch(self, op: str, sql: str, *args: Any) -> list[Any]:
        with translate(op):
            conn = await acquire(self.pool, self.acquire_timeout_s, op)
            try:
                return await conn.fetch(sql, *args)
            finally:
                await self.pool.release(conn)

    async def beat(
        self, worker_id: str, *, host: str, pid: int, types: Sequence[str], concurrency: int,
        info: dict[str, Any], running: Sequence[tuple[uuid.UUID, int]] = (),
        held: Iterable[uuid.UUID] = (), previous: datetime | None = None,
    ) -> Beat:
        """Refresh the worker's row; say which of `running` (task id, attempt) it still owns
        (the rest were taken from it, re-queued while it looked dead), and re-queue what runs
        here per Postgres but is not `held` and started before the `previous` beat."""
        rows = await self._fetch(
            "workers.beat", self._beat_sql, worker_id, host, pid, list(types), concurrency,
            info, [t for t, _ in running], [a for _, a in running], list(held), previous,
        )
        beat = Beat(at=next(r[3] for r in rows if r[0] == "beat"))
        for kind, task_id, attempt, _, cancel in rows:
            if kind == "owned":
                beat.owned.add((task_id, attempt))
                if cancel:
                    beat.cancel_requested.add((task_id, attempt))
            elif kind == "forgotten":
                beat.forgotten.append(task_id)
        return beat

    async def remove(self, worker_id: str) -> None:
        """A clean stop: the worker is gone at once, not after its TTL."""
        await self._fetch("workers.remove", f"DELETE FROM {self.table} WHERE id = $1",
                          worker_id)

    async def known_and_fresh(
        self, worker_ids: Iterable[str], ttl_s: float
    ) -> tuple[set[str], set[str]]:
        """Of `worker_ids`: those with a row, and those whose beat is within `ttl_s` (by
        Postgres's clock)."""
        ids = sorted(set(worker_ids))
        if not ids:
            return set(), set()
        rows = await self._fetch(
            "workers.fresh",
            f"SELECT id, beat_at > now() - $2 * interval '1 second' FROM {self.table}"
            " WHERE id = ANY($1::text[])",
            ids, ttl_s,
        )
        return {r[0] for r in rows}, {r[0] for r in rows if r[1]}

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


def watch_gap_s(*loop_intervals_s: float) -> float:
    """The longest gap between two looks of a judge shared by loops ticking at these
    intervals that still counts as watching throughout (a tick may run late)."""
    return 2 * max(loop_intervals_s) + 1.0


def confirmation_s(heartbeat_interval_s: float) -> float:
    """How long a stale beat must be watched before its worker is judged dead: a beat period,
    plus a margin for a worker whose beats failed (Postgres was down) to get one through once
    Postgres is back (it retries every second)."""
    return heartbeat_interval_s + 1.0


class Liveness:
    """Judges workers dead: a worker with no row (it stopped, or was pruned) at once; one whose
    beat is older than `ttl_s` once this judge has seen it so continuously for `confirm_s`,
    looking at least every `watch_gap_s` (a longer gap, or a look that failed, starts the
    count again: staleness seen through blind spells is no evidence). Share one per process
    between the loops that judge.

    A worker writes its row before it reads a message, so every worker that holds a message
    or runs a task has one until it stops."""

    def __init__(
        self, workers: WorkerStore, *, ttl_s: float, confirm_s: float, watch_gap_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.workers = workers
        self.ttl_s = ttl_s
        self.confirm_s = confirm_s
        self.watch_gap_s = watch_gap_s
        self.clock = clock
        # worker id → (first seen stale, last seen stale), by `clock`. An observation gap
        # longer than the window restarts the count: the staleness must be watched throughout.
        self._stale: dict[str, tuple[float, float]] = {}

    async def dead(self, worker_ids: Iterable[str]) -> set[str]:
        """The subset of `worker_ids` judged dead now."""
        ids = {w for w in worker_ids if w}
        if not ids:
            return set()
        try:
            known, fresh = await self.workers.known_and_fresh(ids, self.ttl_s)
        except BaseException:
            self._stale.clear()  # blind meanwhile: what was seen before proves nothing now
            raise
        now = self.clock()
        dead = ids - known
        for worker in known:
            if worker in fresh:
                self._stale.pop(worker, None)
                continue
            first, last = self._stale.get(worker, (now, now))
            if now - last > self.watch_gap_s:
                first = now
            self._stale[worker] = (first, now)
            if now - first >= self.confirm_s:
                dead.add(worker)
        for worker, (_, last) in list(self._stale.items()):
            if now - last > self.watch_gap_s:  # not looked at since: forget it
                del self._stale[worker]
        return dead

    async def prune(self) -> int:
        """Delete rows stale for ten TTLs: long judged dead, and no longer evidence of
        anything (a missing row reads as dead)."""
        return await self.workers.prune(10 * self.ttl_s)
