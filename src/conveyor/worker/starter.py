"""Starter: marks tasks `running` for every consumer of a worker, in batches, on one pinned
Postgres connection.

Batches form by themselves: ids that arrive while one statement runs go into the next. While
Postgres is away, or the statement lost a race (a deadlock, a failover), the batch is retried
and its consumers wait, holding their slots; once the drain deadline has passed at shutdown,
waiting starts are given up (their messages stay pending for the rebalancer). A batch Postgres
refuses is started one task at a time; a task whose start is refused alone is reported
`refused` and left as it is, its message pending.

A start commits asynchronously by default (`CONVEYOR_START_COMMIT=async`: `START_SESSION` on
the starter's connection). It is visible to every session at once, so the compare-and-set
that lets one copy of a message run is unchanged; only its flush to disk is left to
PostgreSQL's WAL writer, which spares each start batch the wait for an fsync, the one wait for
the disk in a handler's path. What a crash of PostgreSQL can cost is a start of its last
moments: that task is `queued` again at its previous attempt and the relay publishes it
again. A copy reaching the worker whose handler of it still runs, before that worker's next
beat, makes the start again, and the run goes on (the dispatcher); otherwise the task runs
again and the run it had is not recorded (the next beat finds its lease lost, or its outcome
misses the compare-and-set and is acked as superseded; one still being retried through the
outage can pass it instead, and the second run's outcome is then the superseded one).
Nothing else is at risk: a task's insert and every outcome commit synchronously, and a
synchronous commit flushes all the WAL before it, so a recorded outcome's start is always on
disk with it.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field

import structlog

from conveyor.runtime.outage import Outage
from conveyor.runtime.shutdown import Shutdown
from conveyor.store.pool import Pinned
from conveyor.store.tasks import NotStarted, Started, TaskStore

log = structlog.get_logger("conveyor.starter")

Result = tuple[list[Started], list[NotStarted]]
# The starter's session under CONVEYOR_START_COMMIT=async.
START_SESSION = "SET synchronous_commit = off"


@dataclass(slots=True)
class _Request:
    ids: list[uuid.UUID]
    done: asyncio.Future[Result | None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class Starter:
    """queued → running in batches; one statement (one round trip) per batch."""

    def __init__(self, store: TaskStore, pinned: Pinned, worker_id: str) -> None:
        self.store = store
        self.pinned = pinned
        self.worker_id = worker_id
        self._pending: list[_Request] = []
        self._wake = asyncio.Event()
        self._outage = Outage("worker.start")

    async def start(self, ids: list[uuid.UUID]) -> Result | None:
        """Mark `ids` running; None if given up at shutdown."""
        request = _Request(ids)
        self._pending.append(request)
        self._wake.set()
        return await request.done

    async def run(self, shutdown: Shutdown, until: Shutdown) -> None:
        """Serve starts until `until` begins and none is waiting."""
        until.when_begun(self._wake.set)
        while True:
            if not self._pending:
                if until.begun:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            batch, self._pending = self._pending, []
            result = await self._mark(batch, shutdown)
            if result is None:
                for request in batch:
                    if not request.done.done():
                        request.done.set_result(None)
                continue
            self._hand_out(batch, result)

    @staticmethod
    def _hand_out(batch: list[_Request], result: Result) -> None:
        """Give each started task to exactly one request: two requests may carry copies of one
        task (a re-published message beside the original), and only one may run it."""
        started = {s.id: s for s in result[0]}
        not_started = {n.id: n for n in result[1]}
        for request in batch:
            if request.done.done():  # its consumer was cancelled (forced stop)
                continue
            mine: list[Started] = []
            others: list[NotStarted] = []
            for task_id in request.ids:
                if task_id in started:
                    mine.append(started.pop(task_id))
                elif task_id in not_started:
                    others.append(not_started[task_id])
                else:  # started, by the copy in an earlier request of this batch
                    others.append(NotStarted(task_id, "running", None, False))
            request.done.set_result((mine, others))

    async def _mark(self, batch: list[_Request], shutdown: Shutdown) -> Result | None:
        ids = [i for request in batch for i in request.ids]
        try:
            return await self._outage.until_done(self._mark_ids, ids, shutdown=shutdown)
        except Exception as exc:  # refused: start them one by one, so one task fails alone
            log.warning("starter.batch.refused", tasks=len(ids), error=_describe(exc))
        started: list[Started] = []
        not_started: list[NotStarted] = []
        for task_id in dict.fromkeys(ids):
            try:
                result = await self._outage.until_done(self._mark_ids, [task_id],
                                                       shutdown=shutdown)
            except Exception as exc:
                log.error("starter.task.refused", task_id=str(task_id), error=_describe(exc))
                not_started.append(NotStarted(task_id, None, None, False,
                                              refused=_describe(exc)))
                continue
            if result is None:
                return None
            started += result[0]
            not_started += result[1]
        return started, not_started

    async def _mark_ids(self, ids: list[uuid.UUID]) -> Result:
        return await self.store.mark_running(ids, self.worker_id, via=self.pinned)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
