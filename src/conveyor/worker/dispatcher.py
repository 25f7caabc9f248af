"""Dispatcher: one per task type; starts what its consumer read (queued → running, batched by
the starter), runs each started task's handler, hands the outcome to the recorder, and sends
what cannot run to the settler.

Every message is in the in-flight table from its read until it is settled (or given up), so
the heartbeat keeps it from looking abandoned while Postgres is slow or away. A handler's slot
is free once its outcome is handed over.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

import structlog

from conveyor import metrics, tracing
from conveyor.errors import Unavailable
from conveyor.queue.events import Publisher, cancelled, event
from conveyor.queue.streams import Message, TaskStreams
from conveyor.registry import Lease, TaskType
from conveyor.runtime.shutdown import Shutdown
from conveyor.store.tasks import NotStarted, Started, TaskStore
from conveyor.worker.executor import Executor
from conveyor.worker.gate import Gate
from conveyor.worker.inflight import InFlight
from conveyor.worker.progress import Progress
from conveyor.worker.recorder import Recorder
from conveyor.worker.settler import Settler
from conveyor.worker.slots import Slots
from conveyor.worker.starter import Starter

log = structlog.get_logger("conveyor.dispatcher")


class Dispatcher:
    """Starts and runs one type's messages within the worker's slots."""

    def __init__(
        self,
        task_type: TaskType,
        *,
        store: TaskStore,
        streams: TaskStreams,
        executor: Executor,
        starter: Starter,
        recorder: Recorder,
        slots: Slots,
        in_flight: InFlight,
        spawn: Callable[[asyncio.Future[None]], None],
        publisher: Publisher | None = None,
        progress: Progress | None = None,
        worker_id: str = "",
        gate: Gate | None = None,
    ) -> None:
        self.task_type = task_type
        self.executor = executor
        self.starter = starter
        self.recorder = recorder
        self.slots = slots
        self.in_flight = in_flight
        self.spawn = spawn
        self.publisher = publisher
        self.progress = progress
        self.worker_id = worker_id
        self.gate = gate
        self.store = store
        self.streams = streams
        self._leased: set[bytes] = set()  # stream ids read under a concurrency lease
        self.settler = Settler(store, streams, f"dispatcher.{task_type.name}.settle",
                               publisher=publisher)
        self._wait = metrics.type_meters(task_type.name).wait
        self.processed = 0  # handler runs finished

    async def dispatch(self, consumer: str, messages: list[Message], shutdown: Shutdown,
                       *, leased: bool = False) -> None:
        """Mark the messages' tasks running and spawn their handlers; settle the rest.

        Every message is in `in_flight` from its read until it is acked (or given up), so the
        heartbeat keeps it from looking abandoned while Postgres is slow or away.
        """
        if self.gate is not None and self.gate.of(self.task_type.name).paused:
            # Read by a blocking read begun before the pause reached this worker: not started,
            # handed back to the stream for after the resume.
            await self._hand_back_paused(messages, leased=leased)
            return
        if leased:
            self._leased.update(m.stream_id for m in messages)
        fresh = self.in_flight.hold(self.task_type.name, consumer, messages)
        if len(fresh) < len(messages):
            log.info("worker.message.redelivered", task_type=self.task_type.name,
                     held_already=len(messages) - len(fresh))
            kept = {m.stream_id for m in fresh}
            self._free([m for m in messages if m.stream_id not in kept])
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
            started = self._restarted(started, by_task, duplicates)
        adopted, not_started = self._adopt(not_started, by_task)
        if self.gate is not None and started and self.gate.keyed(self.task_type.name):
            started = await self._keyed(started, by_task, shutdown)
        now = time.time()
        if self.publisher is not None and started:
            self.publisher.emit(*(
                event("started", t.id, t.type, "running", attempt=t.attempt,
                      worker=self.worker_id, started_at=t.started_at)
                for t in started))
        for task in [*started, *adopted]:
            self._wait.observe(max(0.0, now - task.run_at.timestamp()))
            self.spawn(asyncio.ensure_future(self._run_one(by_task[task.id], task)))
        unrunnable = undecodable + duplicates + [by_task[ns.id] for ns in not_started]
        if unrunnable:
            await self.settler.unrunnable(self.task_type.name, undecodable, duplicates,
                                          not_started, by_task, shutdown)
            self._release(unrunnable)

    async def _hand_back_paused(self, messages: list[Message], *, leased: bool) -> None:
        name = self.task_type.name
        try:
            await self.streams.requeue(
                name, messages, max_requeues=max(m.requeues for m in messages) + 1)
        except Unavailable as exc:  # left pending: the rebalancer hands them on
            log.warning("flow.paused.hand_back_failed", task_type=name, messages=len(messages),
                        error=str(exc))
        log.info("flow.paused.handed_back", task_type=name, messages=len(messages))
        self.slots.give(len(messages))
        if leased and self.gate is not None:
            self.gate.release(name, len(messages))

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
        held = self.in_flight.held_ids(exclude=batch)
        adopted = [ns.running_here for ns in mine
                   if ns.running_here is not None and ns.id not in held]
        taken = {t.id for t in adopted}
        return adopted, [ns for ns in not_started if ns.id not in taken]

    def _restarted(self, started: list[Started], by_task: dict[uuid.UUID, Message],
                   duplicates: list[Message]) -> list[Started]:
        """Started tasks whose handler already runs here at that very attempt, its lease
        held, are not run again: the start was one a Postgres crash forgot (the task read
        `queued` at the attempt before), made again by a copy the relay published. The row
        now says what the first start said, so the running handler's outcome is recorded as
        its own; the copy is acked as a duplicate. A handler whose lease a beat found lost
        meanwhile does not count (its outcome is discarded): the copy runs."""
        again = [t for t in started if self.in_flight.holding(t.id) > 1
                 and any(h.lease is not None and not h.lease.lost
                         for h in self.in_flight.running_task(t.id, t.attempt))]
        if not again:
            return started
        log.warning("worker.start.restored", task_type=self.task_type.name,
                    tasks=[str(t.id) for t in again])
        duplicates.extend(by_task.pop(t.id) for t in again)
        return [t for t in started if t.id in by_task]

    def _release(self, messages: list[Message]) -> None:
        """Stop holding `messages` (acked, or left pending) and free their slots."""
        self.in_flight.release((self.task_type.name, m.stream_id) for m in messages)
        self._free(messages)

    def _free(self, messages: list[Message]) -> None:
        """Free the slots of `messages`, and the concurrency leases they were read under."""
        self.slots.give(len(messages))
        if self._leased and self.gate is not None:
            leased = [m.stream_id for m in messages if m.stream_id in self._leased]
            if leased:
                self._leased.difference_update(leased)
                self.gate.release(self.task_type.name, len(leased), keep=True)

    async def _keyed(self, started: list[Started], by_task: dict[uuid.UUID, Message],
                     shutdown: Shutdown) -> list[Started]:
        """The started tasks their keys' limits let run now; the others are put back, due
        when their key may have room (queued again, the attempt not counted), their
        messages acked. Without Redis or Postgres to ask or to put them back, they run (a
        limit met late, nothing lost: a task is never left running without a handler)."""
        assert self.gate is not None
        name = self.task_type.name
        try:
            allowed, deferred = await self.gate.admit_keyed(name, started)
        except Unavailable as exc:
            log.warning("flow.keyed.unchecked", task_type=name, tasks=len(started),
                        error=str(exc))
            return started
        if not deferred:
            return allowed
        try:
            returned = await self.store.defer(
                [(t.id, t.attempt, delay) for t, delay, _ in deferred], self.worker_id)
        except Unavailable as exc:  # still running here: run them rather than strand them
            log.warning("flow.defer.failed", task_type=name, tasks=len(deferred),
                        error=str(exc), running_instead=True)
            return allowed + [t for t, _, _ in deferred]
        back = set(returned.queued)
        now_ms = int(time.time() * 1000)
        if returned.cancelled and self.publisher is not None:  # asked while put back
            self.publisher.emit(*(cancelled(i, name, at) for i, at in returned.cancelled))
        # Retried while Redis is away (until the drain deadline): left pending otherwise, for
        # the rebalancer to hand on; the relay publishes a task Redis lost.
        await self.settler.settle(
            name, [by_task[t.id].stream_id for t, _, _ in deferred],
            delays=[(t.id, now_ms + int(delay * 1000)) for t, delay, _ in deferred
                    if t.id in back],
            levels={t.id: t.priority for t, _, _ in deferred if t.priority is not None},
            shutdown=shutdown)
        self._release([by_task[t.id] for t, _, _ in deferred])
        return allowed

    async def _run_one(self, message: Message, task: Started) -> None:
        """Run one handler; its slot is free once it ends, its outcome handed to the recorder
        (which acks the message, and drops it from `in_flight`, after recording it). An outcome
        whose lease was lost meanwhile is discarded: the task belongs to another attempt now.
        Cancelled at the drain deadline, it stays in `in_flight` for the worker to hand back."""
        key = (self.task_type.name, message.stream_id)
        lease = Lease(self.progress.report if self.progress is not None else None)
        if self.progress is not None:
            self.progress.running(str(task.id), task.type)
        handler = asyncio.current_task()
        assert handler is not None
        self.in_flight.running(*key, task.attempt, handler, lease, run_in=self.task_type.run_in)
        try:
            execute = self.executor.traced if tracing.enabled() else self.executor.execute
            outcome = await execute(self.task_type, task, lease)
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
            self.in_flight.submitted(key)  # a drain deadline from here on keeps the outcome
            await self.recorder.submit(message.stream_id, outcome)
        except asyncio.CancelledError:
            if lease.lost:
                self.in_flight.release([key])
            # Otherwise the drain deadline or a forced stop: the entry stays for the worker to
            # hand back (or to leave pending, for the rebalancer once this worker is gone).
            raise
        except BaseException:
            self.in_flight.release([key])
            raise
        finally:
            self.processed += 1
            self._free([message])
            if self.gate is not None:
                self.gate.release_keyed(task.id)
            if self.progress is not None:
                self.progress.done(str(task.id))
