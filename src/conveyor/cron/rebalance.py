"""Rebalancer: every interval, hands abandoned pending messages to whoever reads next,
dead-letters messages that keep coming back and removes emptied dead consumers.  [rebalance]
(Streams are trimmed by the workers and the janitor.)

A message is abandoned when it has been idle for a whole heartbeat TTL: a live worker resets
the idle time of every message it holds at each beat, so that happens when its worker died or
lost track of it (or Redis was away and nobody could refresh). The take re-checks that idle
time atomically. A message whose task runs on a worker that is not judged dead (see
`store/workers.py`) is left with it: idle times lie after a long Redis outage, the task record
does not. Each taken task goes back to `queued` in Postgres first, then a fresh copy goes on
the stream: a worker reading the copy finds the task runnable.
"""

from __future__ import annotations

import uuid
from datetime import datetime

import structlog

from conveyor import metrics
from conveyor.cron._locked import LockedLoop
from conveyor.errors import Unavailable
from conveyor.queue.connection import Redis
from conveyor.queue.events import EventLog, cancelled, event
from conveyor.queue.keys import Keys, worker_of
from conveyor.queue.streams import TaskStreams
from conveyor.store.tasks import TaskStore
from conveyor.store.workers import Liveness

log = structlog.get_logger("conveyor.rebalance")


class Rebalancer(LockedLoop):
    """Options: `ttl_s` (a consumer's messages must be idle this long), `max_requeues` (then
    the message is dead-lettered)."""

    name = "rebalance"

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        streams: TaskStreams,
        store: TaskStore,
        types: list[str],
        *,
        liveness: Liveness,
        interval_s: float,
        ttl_s: float,
        max_requeues: int,
        events: EventLog | None = None,
    ) -> None:
        super().__init__(redis, keys, streams, store, types, interval_s=interval_s)
        self.liveness = liveness
        self.events = events  # where the `dead` events of what it dead-letters go
        self.min_idle_ms = int(ttl_s * 1000)
        self.max_requeues = max_requeues

    async def tick(self) -> None:
        for task_type in self.types:
            await self.rebalance(task_type)

    async def rebalance(self, task_type: str) -> tuple[int, int]:
        """Re-queue one type's abandoned messages; returns (re-queued, dead-lettered).

        A message is abandoned when it has been idle a whole heartbeat TTL: its worker is
        dead, or alive but not running its task (a live worker refreshes every message it
        holds at each beat). A task running on a live worker per Postgres stays with it: it
        runs there, or the worker's own beat gives it back if it lost track of it. For a live
        worker nothing is written to Postgres at all, so a start it commits meanwhile stands.
        """
        consumers = await self.streams.consumers(task_type)
        dead_workers = await self.liveness.dead({worker_of(c.name) for c in consumers})
        requeued_total = dead_total = 0
        for consumer in consumers:
            worker = worker_of(consumer.name)
            alive = worker not in dead_workers
            if consumer.pending == 0:
                if not alive and consumer.idle_ms >= self.min_idle_ms:
                    await self.streams.delete_consumer(task_type, consumer.name)
                    log.info("rebalance.consumer.removed", consumer=consumer.name)
                continue
            stale = await self.streams.stale_pending(task_type, consumer.name, self.min_idle_ms)
            # Claim first: XCLAIM re-checks the idle time atomically, so what its worker just
            # refreshed stays with it. Then a dead worker's tasks go back to queued in
            # Postgres, and only then do copies go on the stream: a worker reading a copy
            # finds its task runnable.
            claimed = await self.streams.claim(task_type, consumer.name, stale,
                                               min_idle_ms=self.min_idle_ms)
            if alive and claimed:  # its running tasks are its own: they stay (claimed back)
                mine = await self.store.running_on(
                    [m.task_id for m in claimed if m.task_id], worker)
                claimed = [m for m in claimed if m.task_id not in mine]
            if not claimed:
                continue
            if not alive:
                returned = await self.store.requeue(
                    [m.task_id for m in claimed if m.task_id], worker)
                await self._announce(task_type, returned.cancelled)
            requeued, dead = await self.streams.requeue(task_type, claimed,
                                                        max_requeues=self.max_requeues)
            if dead:
                await self._kill(task_type, dead)
            requeued_total += len(requeued)
            dead_total += len(dead)
            metrics.REBALANCED.labels(task_type).inc(len(requeued))
            log.info("rebalance.requeued", consumer=consumer.name, task_type=task_type,
                     worker_alive=alive, requeued=len(requeued),
                     dead_lettered=len(dead))
        return requeued_total, dead_total

    async def _announce(self, task_type: str,
                        ended: list[tuple[uuid.UUID, datetime]]) -> None:
        """Tell waiters and followers of tasks that ended cancelled as they were taken back."""
        if self.events is None or not ended:
            return
        try:
            await self.events.publish([cancelled(i, task_type, at) for i, at in ended])
        except Unavailable as exc:  # a wait still ends, on its timeout, from Postgres
            log.warning("rebalance.events.unpublished", tasks=len(ended), error=str(exc))

    async def _kill(self, task_type: str, task_ids: list[uuid.UUID]) -> None:
        reason = f"delivery limit reached: re-queued {self.max_requeues} times after lost workers"
        # re-queued just now: queued, unless started
        killed = await self.store.kill(task_ids, reason)
        metrics.DEAD_LETTERED.labels(task_type, "deliveries").inc(len(task_ids))
        if self.events is None or not killed:
            return
        try:  # waiters and followers learn of it now (rare: the rows are read for their times)
            records = [r for r in [await self.store.get(t) for t in killed] if r is not None]
            await self.events.publish([
                event("dead", r.id, task_type, "dead", error=r.last_error,
                      run_at=r.run_at, started_at=r.started_at, finished_at=r.finished_at)
                for r in records if r.status == "dead"])
        except Unavailable as exc:  # a wait still ends, on its timeout, from Postgres
            log.warning("rebalance.events.unpublished", tasks=len(killed), error=str(exc))
