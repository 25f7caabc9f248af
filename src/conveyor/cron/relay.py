"""Relay: what is committed in Postgres reaches Redis, even after a crash between commit and
publish or after Redis lost its data.  [Postgres → Redis]

Each tick, per type: if the group's undelivered backlog is small enough to read, queued tasks
overdue by more than `grace_s` that are neither in that backlog nor in the delayed set are not
in Redis at all (a delivered message has made its task `running` within moments), so they are
published again. Tasks still `running` on a worker judged dead (`store/workers.py`: its beat in
Postgres, which a Redis wipe cannot fake) whose consumer holds nothing (the rebalancer empties
it first) lost their message with Redis: they go back to `queued` and are published. A task
running on a live worker is never touched, whatever Redis lost. A duplicate message is
harmless: the worker's compare-and-set on `queued → running` lets only one copy run.

Besides the scan, the relay listens for the NOTIFY that `Conveyor.enqueue` sends on commit, and
publishes those tasks at once.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from datetime import datetime

import structlog

from conveyor import metrics
from conveyor.cron._locked import LockedLoop
from conveyor.errors import Unavailable
from conveyor.queue.connection import Redis
from conveyor.queue.keys import Keys, consumer_name
from conveyor.queue.streams import Publish, TaskStreams
from conveyor.runtime.outage import Outage
from conveyor.runtime.shutdown import Shutdown
from conveyor.store.pool import Connection, translate
from conveyor.store.tasks import TaskStore
from conveyor.store.workers import Liveness

log = structlog.get_logger("conveyor.relay")
NOTIFIED_MAX = 10_000  # notified tasks waiting to be published; past it, left to the scan


class Relay(LockedLoop):
    """Options: `grace_s` (how overdue a queued task must be before it counts as lost),
    `ttl_s` (heartbeat TTL), `scan_limit` (largest backlog read per type), `page` (rows per
    query)."""

    name = "relay"

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
        grace_s: float,
        ttl_s: float,
        scan_limit: int = 10_000,
        page: int = 1000,
    ) -> None:
        super().__init__(redis, keys, streams, store, types, interval_s=interval_s)
        self.liveness = liveness
        self.grace_s = grace_s
        self.ttl_s = ttl_s
        self.scan_limit = scan_limit
        self.page = page
        self._notified: list[Publish] = []
        self._wake = asyncio.Event()

    async def run(self, shutdown: Shutdown) -> None:
        """Scan every interval and publish notified tasks, until shutdown begins."""
        listener = asyncio.create_task(self._listen(shutdown), name="relay.listen")
        try:
            await super().run(shutdown)
        finally:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)

    async def tick(self) -> None:
        for task_type in self.types:
            await self.relay_overdue(task_type)
        await self.relay_orphans()
        # A dead worker's row is evidence only while it is being judged: keep it ten TTLs.
        await self.liveness.workers.prune(10 * self.ttl_s)

    async def relay_overdue(self, task_type: str) -> int:
        """Publish overdue queued tasks of `task_type` that Redis does not hold."""
        backlog = await self.streams.undelivered(task_type, self.scan_limit)
        if backlog is None:
            log.info("relay.skipped", task_type=task_type, reason="backlog over scan limit")
            return 0
        published = 0
        after: tuple[datetime, uuid.UUID] | None = None
        while True:
            rows = await self.store.overdue(task_type, self.grace_s, after, self.page)
            candidates = [task_id for _, task_id in rows if task_id not in backlog]
            waiting = await self.streams.delayed_among(task_type, candidates)
            lost = [t for t in candidates if t not in waiting]
            if lost:
                await self.streams.publish([Publish(task_type, t) for t in lost])
                published += len(lost)
            if len(rows) < self.page:
                break
            after = rows[-1]
        if published:
            metrics.RELAYED.labels(task_type).inc(published)
            log.warning("relay.republished", task_type=task_type, tasks=published)
        return published

    async def relay_orphans(self) -> int:
        """Re-queue and publish tasks running on dead workers whose messages Redis lost."""
        running = await self.store.running_since(self.ttl_s)
        if not running:
            return 0
        dead = await self.liveness.dead({w for _, _, w in running if w})
        by_owner: dict[tuple[str, str], list[uuid.UUID]] = defaultdict(list)
        for task_id, task_type, worker in running:
            if worker in dead:
                by_owner[(task_type, worker)].append(task_id)
        published = 0
        for (task_type, worker), ids in by_owner.items():
            consumers = await self.streams.consumers(task_type)
            name = consumer_name(worker, task_type)
            if any(c.name == name and c.pending for c in consumers):
                continue  # the rebalancer hands those over
            requeued = await self.store.requeue(ids, worker)
            await self.streams.publish([Publish(task_type, t) for t in requeued])
            published += len(requeued)
            if requeued:
                metrics.RELAYED.labels(task_type).inc(len(requeued))
                log.warning("relay.orphans.requeued", task_type=task_type, worker=worker,
                            tasks=len(requeued))
        return published

    # -- NOTIFY from transactional enqueue -------------------------------------------------

    def _on_notify(self, conn: Connection, pid: int, channel: str, payload: object) -> None:
        if not isinstance(payload, str):
            return
        task_type, _, rest = payload.partition(":")
        raw_id, _, at_ms = rest.partition(":")
        try:
            task_id = uuid.UUID(raw_id)
        except ValueError:
            log.warning("relay.notify.malformed", payload=payload[:200])
            return
        if len(self._notified) >= NOTIFIED_MAX:
            return  # Redis is not keeping up: the periodic scan publishes it after the grace
        self._notified.append(Publish(task_type, task_id, int(at_ms) if at_ms else None))
        self._wake.set()

    async def _listen(self, shutdown: Shutdown) -> None:
        outage = Outage("relay.listen")
        while not shutdown.begun:
            try:
                with translate("relay.listen"):
                    async with self.store.pool.acquire() as conn:
                        await self._serve_notifications(conn, shutdown)
                outage.recovered()
            except Unavailable as exc:
                await outage.failed(exc, shutdown)

    async def _serve_notifications(self, conn: Connection, shutdown: Shutdown) -> None:
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _c: lost.set())
        await conn.add_listener(self.store.channel, self._on_notify)
        try:
            while not shutdown.begun and not lost.is_set():
                self._wake.clear()
                if self._notified:
                    batch, self._notified = self._notified, []
                    try:
                        await self.streams.publish(batch)
                    except Unavailable as exc:
                        log.warning("relay.notify.deferred", tasks=len(batch), error=str(exc))
                waiter = asyncio.ensure_future(self._wake.wait())
                await asyncio.wait({waiter}, timeout=1.0)
                waiter.cancel()
        finally:
            if not conn.is_closed():
                await conn.remove_listener(self.store.channel, self._on_notify)
        if lost.is_set():
            raise Unavailable("relay.listen", "listener connection lost")
