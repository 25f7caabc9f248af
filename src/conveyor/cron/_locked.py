"""LockedLoop: the shape shared by rebalance and relay — every interval, take a Redis lock, run
one tick over the task types, release it. A failed tick is logged and counted; the next one
tries again."""

from __future__ import annotations

import abc
import asyncio

import structlog

from conveyor import metrics
from conveyor.errors import Unavailable
from conveyor.queue.connection import Redis
from conveyor.queue.keys import Keys
from conveyor.queue.lock import Lock
from conveyor.queue.streams import TaskStreams
from conveyor.runtime.outage import Outage
from conveyor.runtime.shutdown import Shutdown
from conveyor.store.tasks import TaskStore

log = structlog.get_logger("conveyor.cron")


class LockedLoop(abc.ABC):
    """Runs `tick()` every `interval_s` in at most one process at a time (the lock is named
    after the loop)."""

    name: str

    def __init__(
        self, redis: Redis, keys: Keys, streams: TaskStreams, store: TaskStore,
        types: list[str], *, interval_s: float,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.streams = streams
        self.store = store
        self.types = types
        self.interval_s = interval_s
        # The TTL frees the lock if its holder dies mid-tick; a tick should finish well within.
        self.lock = Lock(redis, keys.lock(self.name), ttl_ms=int(max(30.0, 3 * interval_s) * 1000))
        self._outage = Outage(self.name)

    @abc.abstractmethod
    async def tick(self) -> None:
        """One pass; must be safe to run concurrently with itself (the lock is an economy)."""

    async def run(self, shutdown: Shutdown) -> None:
        """Tick at start and then every `interval_s` until shutdown begins."""
        while True:
            await self.locked_tick()
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                # A cancel that a client library turned into an error (caught above as a failed
                # tick) is delivered only once: honour it here, or the loop would run on.
                raise asyncio.CancelledError
            if await shutdown.wait(self.interval_s):
                return

    async def locked_tick(self) -> bool:
        """Run one tick if the lock is free; True if it ran."""
        try:
            if not await self.lock.acquire():
                return False
            try:
                await self.tick()
            finally:
                await self.lock.release()
            self._outage.recovered()
            return True
        except Unavailable as exc:
            self._outage.note(exc)
            metrics.TICK_FAILURES.labels(self.name).inc()
        except Exception:
            log.exception(f"{self.name}.tick.failed")
            metrics.TICK_FAILURES.labels(self.name).inc()
        return False
