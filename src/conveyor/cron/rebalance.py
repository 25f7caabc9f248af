"""Rebalancer: every interval, hands the pending messages of dead consumers to live ones,
dead-letters messages that keep coming back, removes emptied dead consumers and trims streams.
[rebalance]

A consumer is dead when its worker's heartbeat record is gone. Its messages are taken only if
idle for a whole heartbeat TTL (a live worker resets the idle time of what it holds at every
beat), and the take re-checks that idle time atomically, so a message is never taken from a
worker that is still working on it. For each taken message the task goes back to `queued` in
Postgres first, then a fresh copy goes on the stream: a worker reading the copy finds the task
runnable.
"""

from __future__ import annotations

import uuid

import structlog

from conveyor import metrics
from conveyor.cron._locked import LockedLoop
from conveyor.queue.connection import Redis, translate
from conveyor.queue.keys import Keys, worker_of
from conveyor.queue.streams import TaskStreams
from conveyor.store.tasks import TaskStore

log = structlog.get_logger("conveyor.rebalance")


async def live_workers(redis: Redis, keys: Keys, worker_ids: set[str]) -> set[str]:
    """The subset of `worker_ids` whose heartbeat record exists."""
    ids = sorted(worker_ids)
    if not ids:
        return set()
    with translate("heartbeat.exists"):
        async with redis.pipeline(transaction=False) as pipe:
            for w in ids:
                pipe.exists(keys.worker(w))
            found = await pipe.execute()
    return {w for w, n in zip(ids, found, strict=True) if n}


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
        interval_s: float,
        ttl_s: float,
        max_requeues: int,
    ) -> None:
        super().__init__(redis, keys, streams, store, types, interval_s=interval_s)
        self.min_idle_ms = int(ttl_s * 1000)
        self.max_requeues = max_requeues

    async def tick(self) -> None:
        for task_type in self.types:
            await self.rebalance(task_type)
            await self.streams.trim(task_type)

    async def rebalance(self, task_type: str) -> tuple[int, int]:
        """Re-queue one type's messages held by dead consumers; returns (re-queued, dead)."""
        consumers = await self.streams.consumers(task_type)
        live = await live_workers(self.redis, self.keys, {worker_of(c.name) for c in consumers})
        requeued_total = dead_total = 0
        for consumer in consumers:
            worker = worker_of(consumer.name)
            if worker in live:
                continue
            if consumer.pending == 0:
                if consumer.idle_ms >= self.min_idle_ms:
                    await self.streams.delete_consumer(task_type, consumer.name)
                    log.info("rebalance.consumer.removed", consumer=consumer.name)
                continue
            stale = await self.streams.stale_pending(task_type, consumer.name, self.min_idle_ms)
            if not stale:
                continue
            task_ids = [m.task_id for m in stale if m.task_id is not None]
            await self.store.requeue(task_ids, worker)
            requeued, dead = await self.streams.requeue(
                task_type, consumer.name, [m.stream_id for m in stale],
                min_idle_ms=self.min_idle_ms, max_requeues=self.max_requeues,
            )
            if dead:
                await self._kill(task_type, dead)
            requeued_total += len(requeued)
            dead_total += len(dead)
            metrics.REBALANCED.labels(task_type).inc(len(requeued))
            log.info("rebalance.requeued", consumer=consumer.name, task_type=task_type,
                     requeued=len(requeued), dead_lettered=len(dead))
        return requeued_total, dead_total

    async def _kill(self, task_type: str, task_ids: list[uuid.UUID]) -> None:
        reason = f"delivery limit reached: re-queued {self.max_requeues} times after lost workers"
        await self.store.kill(task_ids, reason, from_=("queued", "running"))
        metrics.DEAD_LETTERED.labels(task_type, "deliveries").inc(len(task_ids))
