"""Consumer: one per task type; reads its stream through the group and starts handlers; what
cannot run goes to the settler.  [consumers A, B]

Each read asks for no more messages than there are free slots (`slots.py` says how they are
shared). A consumer alone in its worker blocks in XREADGROUP on the slots it took. With several
types, a read never blocks: one that came back short is followed by a wait, holding no slot,
for an entry newer than the stream's last one at that read (`TaskStreams.wait_new`, at most
`read_block`), so an idle stream never sits on a slot a busy one could use. A new entry wakes
every idle consumer of its type in every such worker: one read gets it, the others get nothing
and wait again. A read that found a full batch is followed at once by another for every free
slot.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

import structlog

from conveyor import metrics
from conveyor.errors import Unavailable
from conveyor.queue.keys import consumer_name
from conveyor.queue.streams import Message, TaskStreams
from conveyor.registry import Lease, TaskType
from conveyor.runtime.outage import Outage
from conveyor.runtime.shutdown import Shutdown
from conveyor.store.tasks import NotStarted, Started, TaskStore
from conveyor.worker.executor import Executor
from conveyor.worker.inflight import InFlight
from conveyor.worker.recorder import Recorder
from conveyor.worker.settler import Settler
from conveyor.worker.slots import Slots
from conveyor.worker.starter import Starter

log = structlog.get_logger("conveyor.consumer")


class Consumer:
    """Reads one type's stream and runs its handlers within the worker's slots."""

    def __init__(
        self,
        task_type: TaskType,
        *,
        worker_id: str,
        store: TaskStore,
        streams: TaskStreams,
        executor: Executor,
        starter: Starter,
        recorder: Recorder,
        slots: Slots,
        in_flight: InFlight,
        spawn: Callable[[asyncio.Future[None]], None],
        block_ms: int,
        solo: bool,
    ) -> None:
        self.task_type = task_type
        self.name = consumer_name(worker_id, task_type.name)
        self.worker_id = worker_id
        self.store = store
        self.streams = streams
        self.executor = executor
        self.starter = starter
        self.recorder = recorder
        self.slots = slots
        self.in_flight = in_flight
        self.spawn = spawn
        self.block_ms = block_ms
        self.solo = solo
        self._read_outage = Outage(f"consumer.{task_type.name}.read")
        self.settler = Settler(store, streams, f"consumer.{task_type.name}.settle")
        self._wait = metrics.type_meters(task_type.name).wait
        self.processed = 0  # handler runs finished

    async def run(self, shutdown: Shutdown) -> None:
        """Read and dispatch until shutdown begins (the slots close); a read in progress
        finishes and what it returned is run as part of the drain, a wait for new entries
        (which holds no slot and claims nothing) is cut short."""
        name = self.task_type.name
        blocking = True  # the last read came back short: the stream is drained
        mark: bytes | None = None  # shared slots: wait, holding none, for entries past this
        while not shutdown.begun:
            want = self.slots.capacity
            if mark is not None:
                try:  # claims nothing, so it ends at once when the slots close
                    arrived = await self.slots.idle(
                        self.streams.wait_new(name, mark, self.block_ms))
                except Unavailable as exc:
                    await self._read_outage.failed(exc, shutdown)
                    arrived = True
                # nothing arrived: read anyway, for one slot, as a safety net (a group lost
                # with Redis's data is recreated by the read)
                want = want if arrived else 1
                mark = None
            taken = await self.slots.take(want)
            if taken == 0:
                return
            last: bytes | None = None
            try:
                if self.solo:  # no one else needs the slots: block on them
                    messages = await self.streams.read(name, self.name, taken,
                                                       self.block_ms if blocking else None)
                else:
                    messages, last = await self.streams.read_marked(name, self.name, taken)
                self._read_outage.recovered()
            except Unavailable as exc:
                self.slots.give(taken)
                await self._read_outage.failed(exc, shutdown)
                continue
            if len(messages) < taken:
                self.slots.give(taken - len(messages))
            blocking = len(messages) < taken
            mark = last if blocking else None
            if messages:  # started alongside the next read, so starts can share a statement
                self.spawn(asyncio.ensure_future(self._start(messages, shutdown)))

    async def _start(self, messages: list[Message], shutdown: Shutdown) -> None:
        """Mark the messages' tasks running and spawn their handlers; settle the rest.

        Every message is in `in_flight` from its read until it is acked (or given up), so the
        heartbeat keeps it from looking abandoned while Postgres is slow or away.
        """
        fresh = self.in_flight.hold(self.task_type.name, self.name, messages)
        if len(fresh) < len(messages):
            log.info("consumer.message.redelivered", task_type=self.task_type.name,
                     held_already=len(messages) - len(fresh))
            self.slots.give(len(messages) - len(fresh))
            messages = fresh
            if not messages:
                return
        undecodable = [m for m in messages if m.task_id is None]
        by_task: dict[uuid.UUID, Message] = {}
        duplicates: list[Message] = []
        for m in messages:
            if m.task_id is not None:
                if m.task_id in by_task:
                    duplicates.append(m)
                else:
                    by_task[m.task_id] = m
        started: list[Started] = []
        not_started: list[NotStarted] = []
        if by_task:
            result = await self.starter.start(list(by_task))
            if result is None:  # gave up at shutdown: the messages stay pending for rebalance
                self._release(messages)
                return
            started, not_started = result
        adopted, not_started = self._adopt(not_started, by_task)
        now = time.time()
        for task in [*started, *adopted]:
            self._wait.observe(max(0.0, now - task.run_at.timestamp()))
            self.spawn(asyncio.ensure_future(self._run_one(by_task[task.id], task)))
        unrunnable = undecodable + duplicates + [by_task[ns.id] for ns in not_started]
        if unrunnable:
            await self.settler.unrunnable(self.task_type.name, undecodable, duplicates,
                                          not_started, by_task, shutdown)
            self._release(unrunnable)

    def _adopt(
        self, not_started: list[NotStarted], by_task: dict[uuid.UUID, Message]
    ) -> tuple[list[Started], list[NotStarted]]:
        """Tasks running here per Postgres but not held here: this worker's own start, whose
        reply was lost before the starter retried it. They are run; copies of tasks this
        worker does hold stay not started (and are acked as duplicates)."""
        mine = [ns for ns in not_started if ns.running_here is not None]
        if not mine:
            return [], not_started
        batch = {(self.task_type.name, by_task[ns.id].stream_id) for ns in mine}
        held = self.in_flight.task_ids(exclude=batch)
        adopted = [ns.running_here for ns in mine
                   if ns.running_here is not None and str(ns.id) not in held]
        taken = {t.id for t in adopted}
        return adopted, [ns for ns in not_started if ns.id not in taken]

    def _release(self, messages: list[Message]) -> None:
        """Stop holding `messages` (acked, or left pending) and free their slots."""
        self.in_flight.release((self.task_type.name, m.stream_id) for m in messages)
        self.slots.give(len(messages))

    async def _run_one(self, message: Message, task: Started) -> None:
        """Run one handler; its slot is free once the outcome is handed to the recorder (which
        acks the message, and drops it from `in_flight`, after recording it). An outcome whose
        lease was lost meanwhile is discarded: the task belongs to another attempt now."""
        key = (self.task_type.name, message.stream_id)
        lease = Lease()
        handler = asyncio.current_task()
        assert handler is not None
        self.in_flight.running(*key, task.attempt, handler, lease,
                               cancellable=self.task_type.run_in == "loop")
        try:
            outcome = await self.executor.execute(self.task_type, task, lease)
            if lease.lost:
                log.warning("task.outcome.discarded", task_id=str(task.id), task_type=task.type,
                            attempt=task.attempt, status=outcome.status,
                            reason="lease lost: the task was handed to another worker")
                metrics.TASKS_FINISHED.labels(task.type, "lease_lost").inc()
                self.in_flight.release([key])
                return
            if outcome.status != "succeeded":
                # Retry and Fail are the handler's own decision; anything else (an exception,
                # a timeout) is a warning carrying the stored traceback.
                error = outcome.error or ""
                asked = error.startswith(("retry requested: ", "failed: "))
                (log.info if asked else log.warning)(
                    "task.failed", task_id=str(task.id), task_type=task.type,
                    attempt=task.attempt, will_retry=outcome.status == "queued",
                    error=error.splitlines()[-1:] if asked else error)
            await self.recorder.submit(message.stream_id, outcome)
        except BaseException:
            # Cancelled at the drain deadline (the worker hands the message back), a forced
            # stop (left pending, for the rebalancer once this worker is gone), or a lost lease.
            self.in_flight.release([key])
            raise
        finally:
            self.processed += 1
            self.slots.give(1)
