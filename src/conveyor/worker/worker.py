"""Worker: a consumer per task type, the starter and recorder (batched Postgres writes), the
forwarder and the heartbeat, and the order in which they stop.  [worker loop]

Start order: the worker's first beat (its row in Postgres) is written before any read, so no
task ever runs on a worker the record does not know.

Stop order (shutdown begun): consumers stop reading → in-flight handlers finish, until the
drain deadline → their outcomes are recorded and acked → the starter and recorder stop → the
heartbeat stops last and deletes the worker's row. Handlers still running at the deadline are
cancelled and their tasks handed back at once (queued again in Postgres, the attempt not
counted, a fresh message on the stream) for a live worker's next read.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
from collections.abc import Sequence
from typing import Any

import structlog

from conveyor import metrics
from conveyor.client import TaskRelatives
from conveyor.config import Settings
from conveyor.egress.client import OutboundHttp
from conveyor.egress.policy import EgressPolicy
from conveyor.errors import ConfigError, Unavailable
from conveyor.queue.events import Publisher, cancelled
from conveyor.queue.flow import FlowRedis
from conveyor.runtime.outage import Outage
from conveyor.runtime.shutdown import Shutdown
from conveyor.state import AppState
from conveyor.store.pool import Pinned
from conveyor.store.queue_settings import QueueSettingsStore
from conveyor.store.tasks import WORKER_PLANS
from conveyor.worker.cancels import Cancels
from conveyor.worker.consumer import Consumer
from conveyor.worker.dispatcher import Dispatcher
from conveyor.worker.executor import Executor
from conveyor.worker.forwarder import Forwarder
from conveyor.worker.gate import Gate
from conveyor.worker.heartbeat import Heartbeat
from conveyor.worker.inflight import Held, InFlight
from conveyor.worker.progress import Progress
from conveyor.worker.recorder import Recorder
from conveyor.worker.slots import Slots
from conveyor.worker.starter import START_SESSION, Starter

log = structlog.get_logger("conveyor.worker")


AFTER_DRAIN_S = 5.0  # for the last writes and the heartbeat's removal, past the drain budget


async def _within(task: asyncio.Task[None], timeout_s: float) -> None:
    """Wait for `task`, cancelling it after `timeout_s`."""
    done, _ = await asyncio.wait({task}, timeout=timeout_s)
    if not done:
        log.warning("worker.stop.timeout", step=task.get_name())
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


class WorkerFailed(Exception):
    """One of the worker's own tasks (a consumer, the starter, the recorder, the forwarder,
    the heartbeat) failed; the worker cancelled its handlers and stopped. Unrecorded outcomes
    stay pending."""

    def __init__(self, worker_id: str, failed: BaseExceptionGroup[BaseException]) -> None:
        first = failed.exceptions[0]
        self.errors = list(failed.exceptions)
        super().__init__(f"worker {worker_id} stopped: {type(first).__name__}: {first}")


def new_worker_id() -> str:
    """Unique per process and start: host, pid and a random suffix."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


def pinned_sessions(settings: Settings) -> tuple[str, str]:
    """The sessions of the worker's two pinned connections, the start's and the outcome's:
    their plan settings (see WORKER_PLANS); a start may commit without waiting for the disk
    (see Starter), an outcome waits."""
    if settings.start_commit == "sync":
        return WORKER_PLANS, WORKER_PLANS
    return f"{START_SESSION}; {WORKER_PLANS}", WORKER_PLANS


class Worker:
    """Runs the handlers of `types` (default: every registered type), at most
    `settings.concurrency` messages in flight. Handlers share `http` (`ctx.http`: by default a
    guarded client under the settings' egress policy), closed when the worker stops."""

    name = "worker"

    def __init__(
        self, state: AppState, *, worker_id: str | None = None, types: list[str] | None = None,
        http: OutboundHttp | None = None,
    ) -> None:
        settings = state.settings
        self.state = state
        self.worker_id = worker_id or new_worker_id()
        registry = state.app.registry
        wanted = types or settings.worker_types or list(registry.types)
        unknown = [t for t in wanted if t not in registry.types]
        if unknown:
            raise ConfigError(f"worker types not registered: {', '.join(unknown)}")
        self.types = [registry.types[t] for t in wanted]
        self.slots = Slots(settings.concurrency)
        self.in_flight = InFlight()
        self.handlers: set[asyncio.Future[None]] = set()
        # The one outbound client of this worker's handlers, closed when the worker stops.
        self.http = http or OutboundHttp(EgressPolicy.from_settings(settings))
        self.publisher = Publisher(state.events, linger_s=settings.record_linger,
                                   busy=lambda: self.slots.in_use > 0)
        self.progress = Progress(state.store, self.publisher, self.worker_id,
                                 interval_s=settings.progress_interval)
        self.cancels = Cancels(state.events, self.in_flight, grace_s=settings.cancel_grace)
        self.executor = Executor(settings, self.worker_id, self.http,
                                 progress=self.progress.report,
                                 relatives=TaskRelatives(state.client))
        # Two connections pinned for the worker's lifetime: one starts tasks, one records them.
        self._pinned = [
            Pinned(state.pool, acquire_timeout_s=settings.pg_acquire_timeout, session=session)
            for session in pinned_sessions(settings)
        ]
        self.gate = Gate(
            self.types, FlowRedis(state.redis, state.keys),
            QueueSettingsStore(state.pool, settings.database_schema,
                               acquire_timeout_s=settings.pg_acquire_timeout),
            self.worker_id, lease_ttl_s=settings.flow_lease_ttl,
            reload_s=settings.flow_reload_interval, poll_s=settings.flow_poll_interval,
            defer_s=settings.flow_defer,
        )
        self.starter = Starter(state.store, self._pinned[0], self.worker_id)
        self.recorder = Recorder(
            state.store, state.streams, self._pinned[1], self.worker_id,
            on_settled=self._settled, capacity=max(100, 4 * settings.concurrency),
            publisher=self.publisher, linger_s=settings.record_linger,
            busy=lambda: self.slots.in_use > 0,
        )
        self.dispatchers = [
            Dispatcher(t, store=state.store, streams=state.streams, executor=self.executor,
                       starter=self.starter, recorder=self.recorder, slots=self.slots,
                       in_flight=self.in_flight, spawn=self._spawn, publisher=self.publisher,
                       progress=self.progress, worker_id=self.worker_id, gate=self.gate)
            for t in self.types
        ]
        self.consumers = [
            Consumer(d.task_type, worker_id=self.worker_id, streams=state.streams,
                     slots=self.slots, dispatcher=d, spawn=self._spawn,
                     block_ms=int(settings.read_block * 1000), solo=len(self.types) == 1,
                     linger_s=settings.read_linger, gate=self.gate)
            for d in self.dispatchers
        ]
        self.forwarder = Forwarder(
            state.streams, wanted, interval_s=settings.forward_interval,
            ranked=[t for t in wanted if state.app.registry.types[t].priorities],
        )
        self.heartbeat = Heartbeat(
            state.workers,
            state.streams,
            self.worker_id,
            interval_s=settings.heartbeat_interval,
            types=wanted,
            concurrency=settings.concurrency,
            in_flight=self.in_flight,
            counters=self._counters,
            cancels=self.cancels,
            store=state.store,
        )

    def _spawn(self, handler: asyncio.Future[None]) -> None:
        self.handlers.add(handler)
        handler.add_done_callback(self._handler_done)

    def _handler_done(self, handler: asyncio.Future[None]) -> None:
        self.handlers.discard(handler)
        if not handler.cancelled() and handler.exception() is not None:
            log.error("worker.handler.crashed", exc_info=handler.exception())

    @property
    def processed(self) -> int:
        """Handler runs finished by this worker."""
        return sum(d.processed for d in self.dispatchers)

    def _settled(self, keys: Sequence[tuple[str, bytes]]) -> None:
        self.in_flight.release(keys)

    def _counters(self) -> dict[str, int]:
        return {"processed": self.processed}

    async def run(self, shutdown: Shutdown) -> None:
        """Consume until shutdown begins, then drain in order (see module docstring)."""
        await self._prepare(shutdown)
        self.executor.warm_up(self.types)
        aux_stop = Shutdown()  # starter, recorder and heartbeat outlive the consumers
        log.info("worker.started", worker=self.worker_id, types=[t.name for t in self.types],
                 concurrency=self.slots.capacity)
        try:
            async with asyncio.TaskGroup() as group:
                starter = group.create_task(self.starter.run(shutdown, aux_stop), name="starter")
                recorder = group.create_task(self.recorder.run(shutdown, aux_stop),
                                             name="recorder")
                heartbeat = group.create_task(self.heartbeat.run(aux_stop), name="heartbeat")
                publisher = group.create_task(self.publisher.run(aux_stop), name="events")
                group.create_task(self.progress.run(aux_stop), name="progress")
                group.create_task(self.cancels.run(aux_stop), name="cancels")
                group.create_task(self.gate.run(aux_stop), name="flow")
                group.create_task(self.forwarder.run(shutdown))
                consumers = [group.create_task(c.run(shutdown)) for c in self.consumers]
                await shutdown.wait()
                self.slots.close()
                log.info("worker.drain.started", in_flight=len(self.handlers),
                         timeout_s=round(shutdown.drain_remaining(), 3))
                await asyncio.gather(*consumers)
                await self._drain(shutdown)
                aux_stop.begin()
                # Bounded even if Postgres or Redis hangs mid-statement: whatever is not
                # written by then stays pending, and runs again elsewhere.
                for task, budget_s in ((starter, shutdown.drain_remaining()),
                                       (recorder, shutdown.drain_remaining()),
                                       (heartbeat, 0.0), (publisher, 0.0)):
                    await _within(task, budget_s + AFTER_DRAIN_S)
        except asyncio.CancelledError:
            aux_stop.force()
            for handler in list(self.handlers):
                handler.cancel()
            raise
        except BaseExceptionGroup as failed:  # one of the worker's own tasks failed
            aux_stop.force()
            await self._abandon()
            raise WorkerFailed(self.worker_id, failed) from failed.exceptions[0]
        finally:
            self.executor.close()
            for pinned in self._pinned:
                await pinned.release()
            await self.http.aclose()
        log.info("worker.stopped", worker=self.worker_id, processed=self.processed)

    async def _abandon(self) -> None:
        """Cancel every handler and start still running: their outcomes were not recorded,
        so their messages stay pending for the rebalancer."""
        if self.handlers:
            log.warning("worker.abandoned", handlers=len(self.handlers))
            await self._cancel_handlers()

    async def _cancel_handlers(self) -> set[asyncio.Future[None]]:
        """Cancel every handler and start still running and wait for them, at most
        AFTER_DRAIN_S; returns those that did not end (they let no cancellation in)."""
        cancelled = set(self.handlers)
        for handler in cancelled:
            handler.cancel()
        if not cancelled:
            return set()
        _, stuck = await asyncio.wait(cancelled, timeout=AFTER_DRAIN_S)
        return stuck

    async def _prepare(self, shutdown: Shutdown) -> None:
        """Create missing groups and write the first beat; wait for Redis and Postgres if they
        are away (until shutdown begins)."""
        outage = Outage("worker.prepare")
        while not shutdown.begun:
            try:
                for t in self.types:
                    await self.state.streams.ensure_group(t.name)
                await self.gate.reload()  # the limits in force before the first read
                await self.heartbeat.beat()
                outage.recovered()
                return
            except Unavailable as exc:
                await outage.failed(exc, shutdown)

    async def _drain(self, shutdown: Shutdown) -> None:
        # Starts still in progress spawn handlers of their own: wait until none is left.
        while self.handlers:
            _, pending = await asyncio.wait(
                set(self.handlers), timeout=shutdown.drain_remaining()
            )
            if not pending:
                continue
            log.warning("worker.drain.timeout", abandoned=len(pending))
            stuck = await self._cancel_handlers()
            if stuck:  # a handler that does not let itself be cancelled
                log.error("worker.drain.stuck", handlers=len(stuck))
                return
            if shutdown.forced:  # left pending, as a crash would leave them
                return
            await self._hand_back(await self._unfinished(shutdown))
        log.info("worker.drain.finished", processed=self.processed)

    async def _unfinished(self, shutdown: Shutdown) -> list[Held]:
        """Tasks whose handlers were cancelled before handing over an outcome, once nothing
        runs them any more: a thread cannot be stopped, so the worker waits for its threads
        (beating meanwhile, so no one else takes their tasks) before it gives them back."""
        unfinished = [h for h in self.in_flight
                      if h.attempt is not None and not h.submitted
                      and h.handler is not None and h.handler.done()]
        threads = self.executor.threads_running()
        if threads and any(h.run_in == "thread" for h in unfinished):
            log.warning("worker.drain.threads", running=len(threads),
                        detail="thread handlers cannot be stopped: waiting for them to return")
            done = asyncio.gather(*(asyncio.wrap_future(f) for f in threads),
                                  return_exceptions=True)
            forced = asyncio.ensure_future(shutdown.wait_forced())
            either: set[asyncio.Future[Any]] = {done, forced}
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            forced.cancel()
            if shutdown.forced:
                done.cancel()
                return []
        return unfinished

    async def _hand_back(self, held: list[Held]) -> None:
        """Give tasks whose handlers were cancelled at the drain deadline back at once: queued
        again in Postgres (this attempt not counted), then a fresh message on the stream and
        the old one acked. What cannot be handed back stays pending for the rebalancer (once
        this worker's row is gone, at its stop)."""
        if not held:
            return
        try:
            returned = await self.state.store.hand_back(
                [(h.message.task_id, h.attempt) for h in held
                 if h.message.task_id is not None and h.attempt is not None],
                self.worker_id,
            )
            back = set(returned.queued)
            ended = dict(returned.cancelled)
            by_type: dict[str, list[Held]] = {}
            for h in held:
                if h.message.task_id in back:
                    by_type.setdefault(h.task_type, []).append(h)
                elif h.message.task_id in ended:  # asked to cancel while it ran: over now
                    self.publisher.emit(cancelled(h.message.task_id, h.task_type,
                                                  ended[h.message.task_id]))
            for task_type, items in by_type.items():
                _, dead = await self.state.streams.requeue(
                    task_type, [h.message for h in items],
                    max_requeues=self.state.settings.max_deliveries,
                )
                if dead:
                    await self.state.store.kill(dead, "delivery limit reached")
                metrics.HANDED_BACK.labels(task_type).inc(len(items))
                self.in_flight.release(h.key for h in items)
            log.info("worker.handed_back", tasks=len(back))
        except Unavailable as exc:
            log.warning("worker.hand_back.failed", tasks=len(held), error=str(exc))
