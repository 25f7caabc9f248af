"""Consumer: one per task type; reads its stream through the group and starts handlers; what
cannot run goes to the settler.  [consumers A, B]

Each read asks for no more messages than there are free slots. With several consumers in one
worker, a blocking read takes one slot, and only while no other consumer is waiting for one:
when slots are short, a consumer reads without blocking, and if its stream was empty it stands
aside until slots are free again (at most `read_block`), so an idle stream never sits on a slot
a busy one could use. A read that found a full batch is followed at once by a non-blocking read
for every free slot.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from conveyor import metrics
from conveyor.errors import Unavailable
from conveyor.queue.keys import consumer_name
from conveyor.queue.streams import Message, TaskStreams
from conveyor.registry import TaskType
from conveyor.runtime.outage import Outage
from conveyor.runtime.shutdown import Shutdown
from conveyor.store.tasks import NotStarted, Started, TaskStore
from conveyor.worker.executor import Executor
from conveyor.worker.recorder import Recorder
from conveyor.worker.settler import Settler
from conveyor.worker.slots import Slots
from conveyor.worker.starter import Starter

log = structlog.get_logger("conveyor.consumer")


@dataclass(slots=True)
class InFlight:
    """A message this worker holds, for the heartbeat's report and idle-time refresh."""

    task_type: str
    consumer: str
    stream_id: bytes
    task_id: str
    since: float


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
        in_flight: dict[tuple[str, bytes], InFlight],
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
        finishes and what it returned is run as part of the drain."""
        blocking = True
        stood_aside = False
        while not shutdown.begun:
            if stood_aside:
                await self.slots.wait_quiet(self.block_ms / 1000)
            want = self.slots.capacity if (self.solo or not blocking) else 1
            taken = await self.slots.take(want)
            if taken == 0:
                return
            contended = not self.solo and self.slots.waiting > 0
            block_ms = self.block_ms if blocking and not contended else None
            try:
                messages = await self.streams.read(self.task_type.name, self.name, taken,
                                                   block_ms)
                self._read_outage.recovered()
            except Unavailable as exc:
                self.slots.give(taken)
                await self._read_outage.failed(exc, shutdown)
                continue
            if len(messages) < taken:
                self.slots.give(taken - len(messages))
            blocking = len(messages) < taken
            stood_aside = contended and not messages
            if messages:  # started alongside the next read, so starts can share a statement
                self.spawn(asyncio.ensure_future(self._start(messages, shutdown)))

    async def _start(self, messages: list[Message], shutdown: Shutdown) -> None:
        """Mark the messages' tasks running and spawn their handlers; settle the rest.

        Every message is in `in_flight` from its read until it is acked (or given up), so the
        heartbeat keeps it from looking abandoned while Postgres is slow or away.
        """
        monotonic = time.monotonic()
        for m in messages:
            key = (self.task_type.name, m.stream_id)
            self.in_flight[key] = InFlight(
                self.task_type.name, self.name, m.stream_id,
                str(m.task_id) if m.task_id else "", monotonic,
            )
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
        held = {h.task_id for key, h in self.in_flight.items() if key not in batch}
        adopted = [ns.running_here for ns in mine
                   if ns.running_here is not None and str(ns.id) not in held]
        taken = {t.id for t in adopted}
        return adopted, [ns for ns in not_started if ns.id not in taken]

    def _release(self, messages: list[Message]) -> None:
        """Stop holding `messages` (acked, or left pending) and free their slots."""
        for m in messages:
            self.in_flight.pop((self.task_type.name, m.stream_id), None)
        self.slots.give(len(messages))

    async def _run_one(self, message: Message, task: Started) -> None:
        """Run one handler; its slot is free once the outcome is handed to the recorder (which
        acks the message, and drops it from `in_flight`, after recording it)."""
        try:
            outcome = await self.executor.execute(self.task_type, task)
            if outcome.status != "succeeded":
                log.info("task.failed", task_id=str(task.id), task_type=task.type,
                         attempt=task.attempt, will_retry=outcome.status == "queued",
                         error=(outcome.error or "").splitlines()[-1:])
            await self.recorder.submit(message.stream_id, outcome)
        except BaseException:
            # Cancelled at the drain deadline or a forced stop: left pending, and no longer
            # refreshed, so the rebalancer hands it on once this worker is gone.
            self.in_flight.pop((self.task_type.name, message.stream_id), None)
            raise
        finally:
            self.processed += 1
            self.slots.give(1)
