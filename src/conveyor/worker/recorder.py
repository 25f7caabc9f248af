"""Recorder: writes handler outcomes to Postgres in batches, then settles their messages in
Redis (retry schedule, dead letter, ack), on one pinned Postgres connection.

Batches form by themselves: outcomes that arrive while one batch is written go into the next,
so a busy worker writes hundreds of rows per round trip and an idle one writes at once. While
handlers are still running, a batch with room waits `linger_s` (a few ms) for their outcomes:
a durable commit costs Postgres about as much CPU as tens of rows, so fewer, fuller batches
are cheaper; the handlers' slots are free meanwhile (an outcome frees its slot when handed
over), so only the ack and the task's final status come later, by at most `linger_s`.
Postgres first, then Redis: the store reports per outcome what it stored, and the settler acks
only those and the superseded (another attempt owns the task). An outcome not recorded stays
pending: retried while Postgres is away, read-only or in conflict; left for the rebalancer if
Postgres refuses even a `dead` record of it. The buffer is bounded (`capacity`): when Postgres
or Redis is away or slow, `submit()` waits, the handlers that finished hold their slots, and
the consumers stop reading.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import structlog
from prometheus_client import Counter

from conveyor import metrics
from conveyor.errors import Unavailable
from conveyor.queue.events import Event, EventKind, Publisher, event
from conveyor.queue.streams import TaskStreams
from conveyor.runtime.outage import Outage
from conveyor.runtime.shutdown import Shutdown
from conveyor.store.pool import Pinned
from conveyor.store.tasks import RECORD_BATCH, Outcome, Recorded, TaskStore
from conveyor.worker.executor import storable
from conveyor.worker.settler import Settler

log = structlog.get_logger("conveyor.recorder")

_OUTCOME_METRIC = {"succeeded": "succeeded", "queued": "retried", "dead": "dead",
                   "cancelled": "cancelled"}
Entry = tuple[bytes, Outcome]


class Recorder:
    """Batched `record` + `settle` for one worker. Options: `capacity` (outcomes waiting to be
    written), `max_batch` (rows per statement); `on_settled` gets the (type, stream id) of the
    messages this worker no longer holds (acked, or lost and left for the rebalancer)."""

    def __init__(
        self,
        store: TaskStore,
        streams: TaskStreams,
        pinned: Pinned,
        worker_id: str,
        *,
        on_settled: Callable[[Sequence[tuple[str, bytes]]], None],
        capacity: int = 1000,
        max_batch: int = RECORD_BATCH,
        publisher: Publisher | None = None,
        linger_s: float = 0.0,
        busy: Callable[[], bool] | None = None,
    ) -> None:
        self.store = store
        self.streams = streams
        self.pinned = pinned
        self.worker_id = worker_id
        self.on_settled = on_settled
        self.max_batch = max_batch
        self.publisher = publisher
        self.linger_s = linger_s
        self.busy = busy
        self._queue: asyncio.Queue[Entry | None] = asyncio.Queue(maxsize=capacity)
        self.settler = Settler(store, streams, "worker.settle")
        self._outage = Outage("worker.record")
        self._finished: dict[tuple[str, str], Counter] = {}

    async def submit(self, stream_id: bytes, outcome: Outcome) -> None:
        """Hand over an outcome; waits only while the buffer is full. The wait is shielded: a
        caller cancelled meanwhile (a drain deadline) does not take the outcome back."""
        entry = (stream_id, outcome)
        if not self._queue.full():  # the common case: no task for the shield
            self._queue.put_nowait(entry)
            return
        await asyncio.shield(self._queue.put(entry))

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
                closing = self._take_waiting(batch)
                if not closing and self._lingers(batch):
                    await asyncio.sleep(self.linger_s)
                    closing = self._take_waiting(batch)
                await self._write(batch, shutdown)
                if closing:
                    await self._drain_rest(shutdown)
                    return
        finally:
            closer.cancel()

    def _take_waiting(self, batch: list[Entry]) -> bool:
        """Add the outcomes waiting to `batch`, up to `max_batch`; True if the closing mark
        was among them."""
        while len(batch) < self.max_batch and not self._queue.empty():
            entry = self._queue.get_nowait()
            if entry is None:
                return True
            batch.append(entry)
        return False

    def _lingers(self, batch: list[Entry]) -> bool:
        """Wait `linger_s` for more outcomes before writing a batch that has room, only while
        handlers are running (more outcomes are coming): one commit then records them all.
        An idle worker writes at once."""
        return (self.linger_s > 0 and len(batch) < self.max_batch
                and self.busy is not None and self.busy())

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
        """Record, then settle, one outcome of each task at a time: a batch can hold two of
        one task (a stale attempt's, from an earlier message of it, beside the current one's),
        and what is recorded, settled and published is kept per task."""
        for part in _rounds(batch):
            await self._write_distinct(part, shutdown)

    async def _write_distinct(self, batch: list[Entry], shutdown: Shutdown) -> None:
        """Record, then settle: only what Postgres accounts for is acked. The recording's
        progress is kept across retries, so an outcome recorded before a failure is not
        recorded again (it would read as superseded and lose its retry schedule)."""
        progress = _Progress([outcome for _, outcome in batch])
        if await self._outage.until_done(self._record, progress, shutdown=shutdown) is None:
            log.warning("recorder.abandoned", outcomes=len(progress.todo))  # left pending
        if self.publisher is not None and progress.stored:
            self.publisher.emit(*self._events(progress))
        unsettled = progress.lost | {o.task_id for o in progress.todo}
        if not await self.settler.recorded(batch, progress.stored, unsettled, shutdown):
            log.warning("recorder.unacked", outcomes=len(batch))  # recorded; left pending
        # Lost outcomes are no longer held either: the rebalancer hands them on once idle.
        waiting = {o.task_id for o in progress.todo}
        self.on_settled([(outcome.task_type, stream_id) for stream_id, outcome in batch
                         if outcome.task_id not in waiting])
        self._count(progress)

    async def _record(self, progress: _Progress) -> bool:
        """One statement for the batch; should Postgres refuse it (not an outage or a
        conflict: a value it will not store), each outcome is recorded alone, and one that
        still fails is recorded as dead with the reason, so one bad outcome never stalls the
        others. Raises Unavailable for `until_done` to retry what is left."""
        if not progress.alone:
            try:
                await self._statement(progress, progress.todo)
                return True
            except Unavailable:
                raise
            except Exception as exc:
                progress.alone = True
                if len(progress.todo) > 1:
                    log.warning("recorder.batch.refused", outcomes=len(progress.todo),
                                error=str(exc))
        for outcome in list(progress.todo):
            try:
                await self._statement(progress, [outcome])
            except Unavailable:
                raise
            except Exception as exc:
                await self._refused(progress, outcome, exc)
        return True

    async def _refused(self, progress: _Progress, outcome: Outcome, exc: Exception) -> None:
        """Record an outcome Postgres refused as dead with the reason; if even that is
        refused, it is lost: left un-acked, to be run again elsewhere."""
        log.error("recorder.outcome.refused", task_id=str(outcome.task_id), error=str(exc))
        dead = dataclasses.replace(
            outcome, status="dead", result_json=None,
            error=storable(f"the outcome could not be stored: {type(exc).__name__}: {exc}"),
        )
        try:
            await self._statement(progress, [dead])
        except Unavailable:
            raise
        except Exception:
            log.exception("recorder.outcome.lost", task_id=str(outcome.task_id))
            progress.todo.remove(outcome)
            progress.lost.add(outcome.task_id)

    async def _statement(self, progress: _Progress, outcomes: list[Outcome]) -> None:
        """Record `outcomes` (one statement) and note in `progress` what was stored."""
        try:
            recorded = await self.store.record(outcomes, self.worker_id, via=self.pinned)
        except Unavailable:
            progress.interrupted = True  # its writes may have committed unseen
            raise
        stored = {r.task_id: r for r in recorded}
        progress.stored.update(stored)
        progress.todo = [o for o in progress.todo if o.task_id not in stored]
        missed = [o for o in outcomes if o.task_id not in stored]
        if missed and progress.interrupted:
            progress.stored.update(await self._already_recorded(missed))
        progress.superseded.update(o.task_id for o in missed if o.task_id not in progress.stored)
        progress.todo = [o for o in progress.todo if o.task_id not in progress.settled]

    async def _already_recorded(self, outcomes: list[Outcome]) -> dict[uuid.UUID, Recorded]:
        """Outcomes found recorded by this worker: an earlier statement of this batch that
        committed although its reply was lost (a compare-and-set miss is not a supersession
        then)."""
        found = {}
        for o in outcomes:
            row = await self.store.get(o.task_id)
            if row is None or row.worker != self.worker_id or row.attempts != o.attempt:
                continue
            # A retry of a task whose cancel was requested is stored `cancelled` instead.
            if row.status == o.status or (o.status == "queued" and row.status == "cancelled"
                                          and row.cancel_requested):
                found[o.task_id] = Recorded(o.task_id, row.status, row.run_at, row.started_at,
                                            row.finished_at)
        return found

    def _events(self, progress: _Progress) -> list[Event]:
        """The events of what was stored, published after the durable write."""
        out = []
        for o in progress.outcomes:
            r = progress.stored.get(o.task_id)
            if r is None:
                continue
            common: dict[str, Any] = {"attempt": o.attempt, "worker": self.worker_id,
                                      "started_at": r.started_at, "finished_at": r.at}
            if r.status == "succeeded":
                out.append(event("succeeded", o.task_id, o.task_type, "succeeded",
                                 result_json=o.result_json, **common))
            elif r.status == "queued":
                out.append(event("retrying", o.task_id, o.task_type, "queued", error=o.error,
                                 outcome=o.kind, run_at=r.run_at, **common))
            else:
                kind: EventKind = "cancelled" if r.status == "cancelled" else "dead"
                outcome = "cancelled" if kind == "cancelled" else o.kind
                out.append(event(kind, o.task_id, o.task_type, kind, error=o.error,
                                 outcome=outcome, **common))
        return out

    def _count(self, progress: _Progress) -> None:
        for o in progress.outcomes:
            if o.task_id in progress.stored:
                outcome = _OUTCOME_METRIC[progress.stored[o.task_id].status]
            elif o.task_id in progress.superseded:
                outcome = "superseded"
                log.warning("worker.outcome.superseded", task_id=str(o.task_id),
                            attempt=o.attempt, task_type=o.task_type)
            elif o.task_id in progress.lost:
                outcome = "lost"
            else:
                continue  # abandoned at shutdown: counted by whoever runs it again
            if outcome == "dead":
                metrics.DEAD_LETTERED.labels(o.task_type, "attempts").inc()
            key = (o.task_type, outcome)
            counter = self._finished.get(key)
            if counter is None:
                counter = self._finished[key] = metrics.TASKS_FINISHED.labels(*key)
            counter.inc()


def _rounds(batch: list[Entry]) -> list[list[Entry]]:
    """`batch` split so that no part holds two outcomes of one task: the n-th outcome of each
    task goes in the n-th part, in order (all in one part, as a rule)."""
    parts: list[list[Entry]] = []
    seen: dict[uuid.UUID, int] = {}
    for entry in batch:
        n = seen.get(entry[1].task_id, 0)
        seen[entry[1].task_id] = n + 1
        if n == len(parts):
            parts.append([])
        parts[n].append(entry)
    return parts


@dataclasses.dataclass(slots=True)
class _Progress:
    """How far one batch's recording has got; kept across the retries of `_write_distinct`."""

    outcomes: list[Outcome]
    todo: list[Outcome] = dataclasses.field(default_factory=list)
    stored: dict[uuid.UUID, Recorded] = dataclasses.field(default_factory=dict)
    superseded: set[uuid.UUID] = dataclasses.field(default_factory=set)
    lost: set[uuid.UUID] = dataclasses.field(default_factory=set)
    alone: bool = False  # Postgres refused the batch: record one outcome per statement
    interrupted: bool = False  # a statement failed with its outcome unknown

    def __post_init__(self) -> None:
        self.todo = list(self.outcomes)

    @property
    def settled(self) -> set[uuid.UUID]:
        return set(self.stored) | self.superseded | self.lost
