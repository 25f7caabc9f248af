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

Besides the scan, the relay publishes at once the tasks that `Conveyor.enqueue` commits inside
a caller's transaction (a NOTIFY, see `store.notify`). However many relays run, one listens: the
holder of a Redis lease (`lock:relay.listen`, TTL `lease_ttl_s`, renewed every third of it).
It publishes only while, by its own clock, a third of the TTL is left, so no two relays publish
one NOTIFY unless a holder stalls for a third of the TTL between that check and its XADD (a
duplicate then is as harmless as any other). The others stand by and take the lease when it is
released (shutdown) or expires (its holder died or lost Redis). Notifications sent in between
reach nobody; the scan publishes those tasks once they are overdue by `grace_s`, as it does for
any task whose publish was lost.

The same NOTIFY announces the dependents a finished task released or cancelled (migration
0007): the relay publishes the released ones and, with `events`, announces every notified task
on the events stream (`queued`, or `cancelled` for one its upstream's failure cancelled).
"""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections import defaultdict
from collections.abc import Collection
from datetime import datetime

import structlog

from conveyor import metrics
from conveyor.cron._locked import LockedLoop
from conveyor.errors import Unavailable
from conveyor.queue.connection import Redis
from conveyor.queue.events import Event, EventLog, cancelled
from conveyor.queue.keys import Keys, consumer_name
from conveyor.queue.lock import Lock
from conveyor.queue.streams import Publish, TaskStreams, level_of
from conveyor.runtime.outage import Outage
from conveyor.runtime.shutdown import Shutdown
from conveyor.store import notify
from conveyor.store.notify import Enqueued
from conveyor.store.pool import translate
from conveyor.store.tasks import TaskStore
from conveyor.store.workers import Liveness

log = structlog.get_logger("conveyor.relay")
NOTIFIED_MAX = 100_000  # notified tasks waiting to be published; past it, left to the scan


class Relay(LockedLoop):
    """Options: `grace_s` (how overdue a queued task must be before it counts as lost),
    `ttl_s` (heartbeat TTL), `scan_limit` (largest backlog read per type), `page` (rows per
    query), `events` (where tasks it ends cancelled are announced), `lease_ttl_s` (listener
    lease; by default three intervals, at least 1 s: how long a dead listener goes
    unreplaced), `ranked` (the types declared with priorities: their tasks are published to
    their level's ready set)."""

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
        lease_ttl_s: float | None = None,
        events: EventLog | None = None,
        ranked: Collection[str] = (),
    ) -> None:
        super().__init__(redis, keys, streams, store, types, interval_s=interval_s)
        self.ranked = frozenset(ranked)
        self.liveness = liveness
        # to announce the dependents a NOTIFY names and tasks of dead workers that end cancelled
        self.events = events
        self.grace_s = grace_s
        self.ttl_s = ttl_s
        self.scan_limit = scan_limit
        self.page = page
        lease_s = lease_ttl_s if lease_ttl_s is not None else max(1.0, 3 * interval_s)
        self.lease = Lock(redis, keys.lock("relay.listen"), ttl_ms=int(lease_s * 1000))
        self._renew_s = lease_s / 3
        self._notified: list[Enqueued] = []  # filled by the listener only while leading
        self._listening = False  # set by the listener while its LISTEN is in place
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
            priorities = {task_id: priority for _, task_id, priority in rows}
            candidates = [task_id for _, task_id, _ in rows if task_id not in backlog]
            waiting = await self.streams.delayed_among(task_type, candidates)
            lost = [t for t in candidates if t not in waiting]
            if lost:
                await self.streams.publish([self._publish(task_type, t, priorities[t])
                                            for t in lost])
                published += len(lost)
            if len(rows) < self.page:
                break
            after = rows[-1][:2]
        if published:
            metrics.RELAYED.labels(task_type).inc(published)
            log.warning("relay.republished", task_type=task_type, tasks=published)
        return published

    def _publish(self, task_type: str, task_id: uuid.UUID, priority: str | None) -> Publish:
        """A task due now: to its level's ready set for a type with priorities (its priority
        kept), to the stream otherwise."""
        return Publish(task_type, task_id,
                       level=level_of(priority) if task_type in self.ranked else None)

    async def _leveled(self, tasks: list[Enqueued]) -> list[Publish]:
        """What to publish for notified tasks. A dependent the trigger released names no
        level: one of a type with priorities goes to its stored priority's ready set."""
        unleveled = [t.task_id for t in tasks if t.task_type in self.ranked and not t.level
                     and t.run_at_ms is None]
        stored = await self.store.priorities(unleveled) if unleveled else {}
        return [self._publish(t.task_type, t.task_id, stored[t.task_id]) if t.task_id in stored
                else Publish(t.task_type, t.task_id, t.run_at_ms, t.level) for t in tasks]

    async def relay_orphans(self) -> int:
        """Re-queue and publish tasks running on dead workers whose messages Redis lost."""
        running = await self.store.running_since(self.ttl_s)
        if not running:
            return 0
        dead = await self.liveness.dead({w for _, _, w, _ in running if w})
        by_owner: dict[tuple[str, str], list[uuid.UUID]] = defaultdict(list)
        priorities = {task_id: priority for task_id, _, _, priority in running}
        for task_id, task_type, worker, _ in running:
            if worker in dead:
                by_owner[(task_type, worker)].append(task_id)
        published = 0
        for (task_type, worker), ids in by_owner.items():
            consumers = await self.streams.consumers(task_type)
            name = consumer_name(worker, task_type)
            if any(c.name == name and c.pending for c in consumers):
                continue  # the rebalancer hands those over
            returned = await self.store.requeue(ids, worker)
            requeued = returned.queued
            await self.streams.publish([self._publish(task_type, t, priorities[t])
                                        for t in requeued])
            if returned.cancelled and self.events is not None:
                await self.events.publish([cancelled(i, task_type, at)
                                           for i, at in returned.cancelled])
            published += len(requeued)
            if requeued:
                metrics.RELAYED.labels(task_type).inc(len(requeued))
                log.warning("relay.orphans.requeued", task_type=task_type, worker=worker,
                            tasks=len(requeued))
        return published

    # -- NOTIFY from transactional enqueue: one listener, the lease holder -----------------

    @property
    def leading(self) -> bool:
        """True while this relay holds the listener lease (by its own clock)."""
        return self.lease.held()

    @property
    def listening(self) -> bool:
        """True while this relay's LISTEN is in place (a NOTIFY sent before reaches nobody,
        and is left to the scan)."""
        return self._listening

    def _on_notify(self, task: Enqueued) -> None:
        if len(self._notified) >= NOTIFIED_MAX:
            return  # Redis is not keeping up: the periodic scan publishes it after the grace
        self._notified.append(task)
        self._wake.set()

    async def _listen(self, shutdown: Shutdown) -> None:
        """Stand by until the lease is free; then listen and publish while it is held."""
        outage = Outage("relay.listen")
        while not shutdown.begun:
            try:
                if await self.lease.acquire():
                    try:
                        await self._lead(shutdown)
                    finally:
                        self._notified.clear()  # not published: the scan will find them
                        await self.lease.release()
                    log.info("relay.listen.stood_down")
                outage.recovered()
            except Unavailable as exc:
                await outage.failed(exc, shutdown)
                continue
            except Exception:
                log.exception("relay.listen.failed")
            await shutdown.wait(self._renew_s)

    async def _lead(self, shutdown: Shutdown) -> None:
        """LISTEN, renew the lease every third of its TTL and publish what is notified; return
        when shutdown begins or the lease is lost."""
        with translate("relay.listen"):
            async with self.store.pool.acquire() as conn, \
                    notify.listening(conn, self.store.channel, self._on_notify) as lost:
                self._listening = True
                log.info("relay.listen.leading")  # once a NOTIFY reaches it
                try:
                    await self._serve(shutdown, lost)
                finally:
                    self._listening = False
        if lost.is_set():
            raise Unavailable("relay.listen", "listener connection lost")

    async def _serve(self, shutdown: Shutdown, lost: asyncio.Event) -> None:
        """Publish what is notified and renew the lease, until shutdown or a lost lease."""
        clock = asyncio.get_running_loop().time
        renew_at = clock() + self._renew_s
        while not shutdown.begun and not lost.is_set():
            self._wake.clear()
            # Publish only with a third of the TTL left, so that a standby cannot have
            # taken over by the time the publish lands.
            if clock() >= renew_at or (self._notified and not self._may_publish()):
                if not await self.lease.extend():
                    log.warning("relay.listen.lease_lost")
                    return
                renew_at = clock() + self._renew_s
            await self._publish_notified()
            waiter = asyncio.ensure_future(self._wake.wait())
            await asyncio.wait({waiter}, timeout=max(0.0, renew_at - clock()))
            waiter.cancel()
        await self._publish_notified()

    def _may_publish(self) -> bool:
        return self.lease.held(margin_s=self._renew_s)

    async def _publish_notified(self) -> None:
        if not self._notified or not self._may_publish():
            return
        batch, self._notified = self._notified, []
        released = [t for t in batch if not t.cancelled]
        also = None
        if self.events is not None:
            announced = [Event("cancelled" if t.cancelled else "queued", str(t.task_id),
                               t.task_type, "cancelled" if t.cancelled else "queued",
                               b'{"outcome":"cancelled"}' if t.cancelled else b"{}")
                         for t in batch]
            also = functools.partial(self.events.add, events=announced)
        try:
            items = await self._leveled(released)
            if items:
                await self.streams.publish(items, also)
            elif self.events is not None and also is not None:
                await self.events.publish(announced)
        except Unavailable as exc:
            # The released ones the scan publishes later; the cancelled ones nothing else
            # announces, so they are announced again at the next pass (a waiter whose hub saw
            # the outage too reads Postgres again anyway: RESYNC).
            again = [t for t in batch if t.cancelled][-NOTIFIED_MAX:]
            self._notified[:0] = again
            log.warning("relay.notify.deferred", tasks=len(batch), kept=len(again),
                        error=str(exc))
