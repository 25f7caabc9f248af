"""Recorder: writes handler outcomes to Postgres in batches, then settles their messages in
Redis (retry schedule, dead letter, ack), on one pinned Postgres connection.

Batches form by themselves: outcomes that arrive while one batch is written go into the next,
so a busy worker writes hundreds of rows per round trip and an idle one writes at once.
Postgres first, then Redis: a message is acked only once its outcome is recorded. The buffer
is bounded (`capacity`): when Postgres or Redis is away or slow, `submit()` waits, the
handlers that finished hold their slots, and the consumers stop reading.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import defaultdict
from collections.abc import Callable, Sequence

import structlog
from prometheus_client import Counter

from conveyor import metrics
from conveyor.errors import Unavailable
from conveyor.queue.streams import TaskStreams
from conveyor.runtime.outage import Outage
from conveyor.runtime.shutdown import Shutdown
from conveyor.store.pool import Pinned
from conveyor.store.tasks import Outcome, Recorded, TaskStore
from conveyor.worker.executor import storable

log = structlog.get_logger("conveyor.recorder")

_OUTCOME_METRIC = {"succeeded": "succeeded", "queued": "retried", "dead": "dead"}
Entry = tuple[bytes, Outcome]


class Recorder:
    """Batched `record` + `settle` for one worker. Options: `capacity` (outcomes waiting to be
    written), `max_batch` (rows per statement); `on_settled` gets the (type, stream id) of the
    messages acked."""

    def __init__(
        self,
        store: TaskStore,
        streams: TaskStreams,
        pinned: Pinned,
        worker_id: str,
        *,
        on_settled: Callable[[Sequence[tuple[str, bytes]]], None],
        capacity: int = 1000,
        max_batch: int = 500,
    ) -> None:
        self.store = store
        self.streams = streams
        self.pinned = pinned
        self.worker_id = worker_id
        self.on_settled = on_settled
        self.max_batch = max_batch
        self._queue: asyncio.Queue[Entry | None] = asyncio.Queue(maxsize=capacity)
        self._outage = Outage("worker.record")
        self._finished: dict[tuple[str, str], Counter] = {}

    async def submit(self, stream_id: bytes, outcome: Outcome) -> None:
        """Hand over an outcome; waits only while the buffer is full."""
        await self._queue.put((stream_id, outcome))

    async def run(self, shutdown: Shutdown, until: Shutdown) -> None:
        """Write until `until` begins and the buffer is empty; once the drain deadline of
        `shutdown` has passed, unwritten outcomes are dropped (their messages stay pending and
        are run again elsewhere)."""
        closer = asyncio.create_task(self._close_when(until))
        try:
            while True:
                first = await self._queue.get()
                if first is None:
                    return
                batch = [first]
                closing = False
                while len(batch) < self.max_batch and not self._queue.empty():
                    entry = self._queue.get_nowait()
                    if entry is None:
                        closing = True
                        break
                    batch.append(entry)
                await self._write(batch, shutdown)
                if closing:
                    await self._drain_rest(shutdown)
                    return
        finally:
            closer.cancel()

    async def _close_when(self, until: Shutdown) -> None:
        await until.wait()
        await self._queue.put(None)

    async def _drain_rest(self, shutdown: Shutdown) -> None:
        rest = []
        while not self._queue.empty():
            entry = self._queue.get_nowait()
            if entry is not None:
                rest.append(entry)
        for start in range(0, len(rest), self.max_batch):
            await self._write(rest[start:start + self.max_batch], shutdown)

    async def _write(self, batch: list[Entry], shutdown: Shutdown) -> None:
        """Record, then settle: each retried on its own, so an outcome recorded before Redis
        failed is not recorded again (it would read as superseded and lose its retry)."""
        outcomes = [outcome for _, outcome in batch]
        recorded = await self._outage.until_done(self._record, outcomes, shutdown=shutdown)
        if recorded is None:
            log.warning("recorder.abandoned", outcomes=len(batch))
            return
        by_id = {r.task_id: r for r in recorded}
        if not await self._outage.until_done(self._settle, batch, by_id, shutdown=shutdown):
            log.warning("recorder.unacked", outcomes=len(batch))  # recorded; left pending
        self.on_settled([(outcome.task_type, stream_id) for stream_id, outcome in batch])
        self._count(outcomes, recorded)

    async def _record(self, outcomes: list[Outcome]) -> list[Recorded]:
        """One statement for the batch; should it fail for a reason other than an outage (a
        value Postgres refuses), each outcome is recorded alone, and one that still fails is
        recorded as dead with the reason, so one bad outcome never stalls the others."""
        try:
            return await self.store.record(outcomes, self.worker_id, via=self.pinned)
        except Unavailable:
            raise
        except Exception as exc:
            if len(outcomes) > 1:
                log.warning("recorder.batch.refused", outcomes=len(outcomes), error=str(exc))
                recorded: list[Recorded] = []
                for outcome in outcomes:
                    recorded += await self._record([outcome])
                return recorded
            log.error("recorder.outcome.refused", task_id=str(outcomes[0].task_id),
                      error=str(exc))
            dead = dataclasses.replace(
                outcomes[0], status="dead", result_json=None,
                error=storable(f"the outcome could not be stored: {type(exc).__name__}: {exc}"),
            )
            try:
                return await self.store.record([dead], self.worker_id, via=self.pinned)
            except Unavailable:
                raise
            except Exception:  # left un-acked: re-run elsewhere once this worker is gone
                log.exception("recorder.outcome.lost", task_id=str(outcomes[0].task_id))
                return []

    async def _settle(self, batch: list[Entry], by_id: dict[object, Recorded]) -> bool:
        by_type: dict[str, list[Entry]] = defaultdict(list)
        for entry in batch:
            by_type[entry[1].task_type].append(entry)
        for task_type, entries in by_type.items():
            delays, dead = [], []
            for _, outcome in entries:
                r = by_id.get(outcome.task_id)
                if r is None:
                    continue
                if r.status == "queued":
                    delays.append((r.task_id, int(r.run_at.timestamp() * 1000)))
                elif r.status == "dead":
                    dead.append((str(r.task_id), outcome.error or "dead"))
            await self.streams.settle(
                task_type, [stream_id for stream_id, _ in entries], delays=delays, dead=dead
            )
        return True

    def _count(self, outcomes: list[Outcome], recorded: list[Recorded]) -> None:
        kept = {r.task_id for r in recorded}
        for o in outcomes:
            outcome = _OUTCOME_METRIC[o.status] if o.task_id in kept else "superseded"
            if outcome == "superseded":
                log.warning("worker.outcome.superseded", task_id=str(o.task_id),
                            attempt=o.attempt, task_type=o.task_type)
            elif outcome == "dead":
                metrics.DEAD_LETTERED.labels(o.task_type, "attempts").inc()
            key = (o.task_type, outcome)
            counter = self._finished.get(key)
            if counter is None:
                counter = self._finished[key] = metrics.TASKS_FINISHED.labels(*key)
            counter.inc()
