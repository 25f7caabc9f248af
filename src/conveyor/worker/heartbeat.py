"""Heartbeat: every interval, the worker's beat in Postgres (its liveness, and the check of
its leases), and a reset of the idle time of every message it holds in Redis.  [heartbeat]

The TTL is a small multiple of the interval: long enough to survive a late beat, short enough
that a dead worker soon disappears. Resetting idle times keeps a long task on a live worker
from looking abandoned to the rebalancer, which only takes messages idle for a whole TTL.
Each beat also learns which running tasks are no longer this worker's (re-queued while it was
stalled past the TTL): their handlers are cancelled, or their outcomes discarded; and trims the
acked entries of the worker's streams (the janitor does too, but a worker may run alone).
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable
from datetime import datetime
from typing import Any

import structlog
from redis.exceptions import ResponseError

from conveyor import metrics
from conveyor.errors import Unavailable
from conveyor.queue.streams import TaskStreams
from conveyor.runtime.outage import Outage
from conveyor.runtime.shutdown import Shutdown
from conveyor.store.tasks import TaskStore
from conveyor.store.workers import WorkerStore
from conveyor.worker.cancels import Cancels
from conveyor.worker.inflight import InFlight

log = structlog.get_logger("conveyor.heartbeat")
_REPORTED_TASKS = 50  # task ids listed in the record; the count is always exact


class Heartbeat:
    """Beats for `worker_id` every `interval_s` (the judge allows it the heartbeat TTL)."""

    def __init__(
        self,
        workers: WorkerStore,
        streams: TaskStreams,
        worker_id: str,
        *,
        interval_s: float,
        types: list[str],
        concurrency: int,
        in_flight: InFlight,
        counters: Callable[[], dict[str, int]],
        cancels: Cancels | None = None,
        store: TaskStore | None = None,
    ) -> None:
        self.workers = workers
        self.streams = streams
        self.worker_id = worker_id
        self.interval_s = interval_s
        self.types = types
        self.concurrency = concurrency
        self.in_flight = in_flight
        self.counters = counters
        self.cancels = cancels
        self.store = store
        self._host = socket.gethostname()
        self._previous: datetime | None = None  # the last beat's time, by Postgres's clock
        self._outage = Outage("worker.heartbeat")
        self._refresh_outage = Outage("worker.heartbeat.refresh")

    async def run(self, stop: Shutdown) -> None:
        """Beat until `stop` begins, then delete the worker's row (unless forced)."""
        while True:
            ok = await self.tick()
            # After a failed beat, try again soon: the beat must be back before its TTL ends.
            if await stop.wait(self.interval_s if ok else min(self.interval_s, 1.0)):
                break
        if not stop.forced:
            try:
                await self.workers.remove(self.worker_id)
            except Unavailable as exc:
                log.warning("heartbeat.remove.failed", error=str(exc))

    async def tick(self) -> bool:
        """One beat; False if Postgres did not take it (logged once per outage). Then the
        refresh of idle times in Redis, bounded by half an interval so that a hung Redis
        never delays the next beat; its failure is logged apart."""
        try:
            await self.beat()
            ok = True
            self._outage.recovered()
        except Unavailable as exc:
            self._outage.note(exc)
            ok = False
        try:
            async with asyncio.timeout(max(0.5, self.interval_s / 2)):
                await self.refresh()
            self._refresh_outage.recovered()
        except Unavailable as exc:
            self._refresh_outage.note(exc)
        except TimeoutError:
            self._refresh_outage.note(Unavailable("streams.refresh", "Redis did not answer"))
        try:
            async with asyncio.timeout(max(0.5, self.interval_s / 2)):
                await self.trim()
        except (Unavailable, TimeoutError, ResponseError) as exc:
            log.warning("heartbeat.trim.failed", error=str(exc)[:200])  # the next beat trims
        return ok

    def info(self) -> dict[str, Any]:
        """What the worker is doing, as GET /v1/workers shows it."""
        held = list(self.in_flight)
        return {
            "in_flight": len(held),
            "tasks": [h.task_id for h in held[:_REPORTED_TASKS]],
            **self.counters(),
        }

    async def refresh(self) -> None:
        """Reset the idle time of every message held (entries Redis lost are skipped)."""
        for (task_type, consumer), ids in self.in_flight.by_consumer().items():
            await self.streams.refresh(task_type, consumer, ids)

    async def trim(self) -> None:
        """Drop the acked entries of this worker's streams, so that a deployment with no cron
        process keeps them bounded (safe from any number of workers at once: see
        TaskStreams.trim)."""
        for task_type in self.types:
            await self.streams.trim(task_type)

    async def beat(self) -> None:
        """Write the beat, give up the tasks Postgres says are no longer ours, and learn which
        tasks it gave back because this worker had lost track of them."""
        asked = self.in_flight.leases()
        beat = await self.workers.beat(
            self.worker_id, host=self._host, pid=os.getpid(), types=self.types,
            concurrency=self.concurrency, info=self.info(), running=asked,
            held=self.in_flight.held_ids(), previous=self._previous,
        )
        self._previous = beat.at
        if beat.forgotten:
            log.warning("worker.tasks.forgotten", tasks=[str(t) for t in beat.forgotten],
                        reason="running here per Postgres, held nowhere here: queued again")
        lost = self.in_flight.lose(asked, beat.owned)
        for held in lost:
            metrics.LEASES_LOST.labels(held.task_type).inc()
            log.warning("task.lease.lost", task_id=held.task_id, task_type=held.task_type,
                        attempt=held.attempt, cancelled=held.cancellable,
                        reason="no longer running here per Postgres: re-queued while this worker"
                               " looked dead (stalled past the TTL), or its start lost in a"
                               " Postgres crash")
        if self.cancels is not None and beat.cancel_requested:
            self.cancels.requested(beat.cancel_requested)
        if lost and self.store is not None:  # its attempt log says lease_lost, not worker_lost
            try:
                await self.store.relabel_lost(
                    [(h.message.task_id, h.attempt) for h in lost
                     if h.message.task_id is not None and h.attempt is not None],
                    self.worker_id)
            except Unavailable as exc:
                log.warning("heartbeat.relabel.failed", error=str(exc))
