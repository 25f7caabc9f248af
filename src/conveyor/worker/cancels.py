"""Cancels: stopping a running task on request. The API marks the task `cancel_requested` in
Postgres and publishes its id on the cancel channel; every worker hears it (within
milliseconds), and the one running the task stops it. A message missed (Redis away, a
reconnect) is made up for at the next beat, whose lease check also returns the flag.

A coroutine is cancelled at once. A thread handler sees `ctx.cancelled` and should return; one
still running after `grace_s` is abandoned (it runs on; its outcome is dropped). A process
handler is terminated after `grace_s`. The attempt ends `cancelled`, and the task with it.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterable

import structlog

from conveyor.queue.events import EventLog
from conveyor.runtime.shutdown import Shutdown
from conveyor.worker.inflight import Held, InFlight

log = structlog.get_logger("conveyor.cancels")


class Cancels:
    """Stops what this worker runs when its cancel is requested."""

    def __init__(self, events: EventLog, in_flight: InFlight, *, grace_s: float) -> None:
        self.events = events
        self.in_flight = in_flight
        self.grace_s = grace_s

    async def run(self, stop: Shutdown) -> None:
        async for task_id in self.events.cancel_requests(stop):
            try:
                self.request(uuid.UUID(task_id))
            except ValueError:
                log.warning("cancels.malformed", payload=task_id[:100])

    def request(self, task_id: uuid.UUID, attempt: int | None = None) -> bool:
        """Stop the task's handler if it runs here (at `attempt`, if given)."""
        found = False
        for held in self.in_flight.running_task(task_id, attempt):
            found = True
            self._stop(held)
        return found

    def requested(self, attempts: Iterable[tuple[uuid.UUID, int]]) -> None:
        """The beat's backstop: attempts Postgres says should stop."""
        for task_id, attempt in attempts:
            self.request(task_id, attempt)

    def _stop(self, held: Held) -> None:
        lease, handler = held.lease, held.handler
        if lease is None or handler is None or lease.cancel_requested:
            return
        lease.request_cancel()
        log.info("task.cancel.requested", task_id=held.task_id, task_type=held.task_type,
                 attempt=held.attempt, run_in=held.run_in)
        if held.run_in == "loop":
            handler.cancel()
            return
        asyncio.get_running_loop().call_later(self.grace_s, self._past_grace, held, handler)

    def _past_grace(self, held: Held, handler: asyncio.Future[None]) -> None:
        if handler.done() or held.submitted:
            return
        log.warning("task.cancel.forced", task_id=held.task_id, task_type=held.task_type,
                    run_in=held.run_in, grace_s=self.grace_s,
                    detail="terminated" if held.run_in == "process" else "abandoned")
        handler.cancel()
