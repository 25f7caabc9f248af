"""Recorder: writes handler outcomes to Postgres in batches, then settles their messages.

Batches form by themselves: whatever outcomes arrive while one batch is being written go into
the next, so a busy worker writes many rows per round trip and an idle one writes at once.
Postgres first, then Redis: an outcome is acked only once it is recorded. While either server
is away the batch is retried; callers wait (holding their slots), which stops further reads.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass, field

import structlog

from conveyor import metrics
from conveyor.errors import Unavailable
from conveyor.queue.streams import TaskStreams
from conveyor.runtime.outage import Outage
from conveyor.runtime.shutdown import Shutdown
from conveyor.store.tasks import Outcome, TaskStore

log = structlog.get_logger("conveyor.recorder")

_OUTCOME_METRIC = {"succeeded": "succeeded", "queued": "retried", "dead": "dead"}


@dataclass(slots=True)
class _Entry:
    stream_id: bytes
    outcome: Outcome
    done: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class Recorder:
    """Batched `record` + `settle` for one worker. Options: `max_batch` rows per statement."""

    def __init__(
        self, store: TaskStore, streams: TaskStreams, worker_id: str, *, max_batch: int = 500
    ) -> None:
        self.store = store
        self.streams = streams
        self.worker_id = worker_id
        self.max_batch = max_batch
        self._queue: asyncio.Queue[_Entry] = asyncio.Queue()
        self._outage = Outage("worker.record")

    async def record(self, stream_id: bytes, outcome: Outcome) -> None:
        """Queue an outcome and wait until it is recorded and its message settled."""
        entry = _Entry(stream_id, outcome)
        self._queue.put_nowait(entry)
        await entry.done

    async def run(self, stop: Shutdown) -> None:
        """Write batches until `stop` begins and nothing is queued; on force, stop at once."""
        while True:
            if self._queue.empty():
                if stop.begun:
                    return
                getter = asyncio.ensure_future(self._queue.get())
                stopper = asyncio.ensure_future(stop.wait())
                await asyncio.wait({getter, stopper}, return_when=asyncio.FIRST_COMPLETED)
                stopper.cancel()
                if not getter.done():
                    getter.cancel()
                    continue
                batch = [getter.result()]
            else:
                batch = [self._queue.get_nowait()]
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            await self._write(batch, stop)

    async def _write(self, batch: list[_Entry], stop: Shutdown) -> None:
        while True:
            try:
                recorded = await self.store.record([e.outcome for e in batch], self.worker_id)
                by_id = {r.task_id: r for r in recorded}
                by_type: dict[str, list[_Entry]] = defaultdict(list)
                for entry in batch:
                    by_type[entry.outcome.task_type].append(entry)
                for task_type, entries in by_type.items():
                    delays, dead = [], []
                    for e in entries:
                        r = by_id.get(e.outcome.task_id)
                        if r is None:
                            continue
                        if r.status == "queued":
                            delays.append((r.task_id, int(r.run_at.timestamp() * 1000)))
                        elif r.status == "dead":
                            dead.append((str(r.task_id), e.outcome.error or "dead"))
                    await self.streams.settle(
                        task_type, [e.stream_id for e in entries], delays=delays, dead=dead
                    )
                self._outage.recovered()
                break
            except Unavailable as exc:
                if stop.forced:
                    for entry in batch:
                        entry.done.cancel()
                    return
                await self._outage.failed(exc)
        for entry in batch:
            o = entry.outcome
            outcome = _OUTCOME_METRIC[o.status] if o.task_id in by_id else "superseded"
            if outcome == "superseded":
                log.warning("worker.outcome.superseded", task_id=str(o.task_id),
                            attempt=o.attempt, task_type=o.task_type)
            elif outcome == "dead":
                metrics.DEAD_LETTERED.labels(o.task_type, "attempts").inc()
            metrics.TASKS_FINISHED.labels(o.task_type, outcome).inc()
            if not entry.done.done():
                entry.done.set_result(None)
