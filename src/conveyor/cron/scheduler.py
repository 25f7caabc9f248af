"""CronScheduler: fires each user cron job once per slot by enqueueing a task whose idempotency
key is the slot, so any number of schedulers produce one task per slot.  [job scheduler]

Slots are computed in UTC from six-field expressions (seconds first). A slot that cannot be
enqueued (Postgres away) is retried until it succeeds; slots that pass meanwhile are skipped,
so an outage produces one late fire, not a burst.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime

import structlog

from conveyor import metrics
from conveyor.client import Client
from conveyor.errors import Unavailable
from conveyor.registry import CronJob, CronTick
from conveyor.runtime.outage import Outage
from conveyor.runtime.shutdown import Shutdown

log = structlog.get_logger("conveyor.cron")


def slot_key(slot: datetime) -> str:
    """The idempotency key of a slot: `cron:<ISO-8601 UTC>`."""
    return "cron:" + slot.astimezone(UTC).isoformat()


class CronScheduler:
    """Enqueues one task per slot for every job of the registry. `clock` returns Unix seconds."""

    name = "cron.scheduler"

    def __init__(
        self,
        client: Client,
        jobs: list[CronJob],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.jobs = jobs
        self.clock = clock
        self._next: dict[str, datetime] = {}
        self._outage = Outage(self.name)

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)

    async def run(self, shutdown: Shutdown) -> None:
        """Fire slots as they come until shutdown begins; a fire in progress completes."""
        if not self.jobs:
            await shutdown.wait()
            return
        now = self._now()
        self._next = {job.name: job.next_after(now) for job in self.jobs}
        while True:
            wait_s = (min(self._next.values()) - self._now()).total_seconds()
            if await shutdown.wait(max(0.0, wait_s)):
                return
            try:
                await self.tick()
                self._outage.recovered()
            except Unavailable as exc:
                await self._outage.failed(exc, shutdown)

    async def tick(self) -> int:
        """Enqueue every slot that is due; returns how many tasks this call created."""
        now = self._now()
        created = 0
        for job in self.jobs:
            slot = self._next.get(job.name) or job.next_after(now)
            if slot > now:
                self._next[job.name] = slot
                continue
            inserted = await self.client.enqueue(
                job.name, CronTick(scheduled_at=slot), idempotency_key=slot_key(slot)
            )
            if inserted.created:
                created += 1
                metrics.CRON_FIRED.labels(job.name).inc()
                log.info("cron.fired", job=job.name, slot=slot.isoformat(),
                         task_id=str(inserted.record.id))
            self._next[job.name] = job.next_after(max(slot, now))
        return created
