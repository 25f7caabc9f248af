"""Settler: the one path by which a worker lets go of a message: schedule its task's retry on
the delayed set, dead-letter it, ack it, or leave it pending with a log line.

The consumers settle what cannot run (undecodable, duplicate, not runnable now); the recorder
settles what it recorded. A message is acked only once Postgres accounts for it: its outcome
is recorded, another attempt owns the task (superseded), or the task is not runnable. What
cannot be settled durably (a start or an outcome Postgres refused) stays pending: the
rebalancer hands it on once it has been idle a heartbeat TTL, and dead-letters it once it keeps
coming back.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Collection, Mapping, Sequence

import structlog

from conveyor import metrics
from conveyor.queue.events import Publisher, event
from conveyor.queue.streams import Message, TaskStreams
from conveyor.runtime.outage import Outage
from conveyor.runtime.shutdown import Shutdown
from conveyor.store.tasks import NotStarted, Outcome, Recorded, TaskStore

log = structlog.get_logger("conveyor.settler")

LAST_ATTEMPT_LOST = "worker lost during the final attempt"


class Settler:
    """Settles messages of one component (`component` names its outage in the logs)."""

    def __init__(self, store: TaskStore, streams: TaskStreams, component: str, *,
                 publisher: Publisher | None = None) -> None:
        self.store = store
        self.streams = streams
        self.publisher = publisher
        self._outage = Outage(component)

    async def settle(
        self,
        task_type: str,
        acks: Sequence[bytes],
        *,
        delays: Sequence[tuple[uuid.UUID, int]] = (),
        dead: Sequence[tuple[str, str]] = (),
        levels: Mapping[uuid.UUID, str] | None = None,
        shutdown: Shutdown,
    ) -> bool:
        """Schedule retries (`levels`: the priority of those that have one), dead-letter,
        then ack (one pipeline), retried while Redis is away; False if given up once the
        drain deadline has passed, or refused by Redis (the messages stay pending)."""
        if not acks and not delays and not dead:
            return True
        try:
            done = await self._outage.until_done(self._settle, task_type, acks, delays, dead,
                                                 levels, shutdown=shutdown)
        except Exception:  # left pending: the rebalancer re-queues it once idle a TTL
            log.exception("settler.failed", task_type=task_type, messages=len(acks))
            return False
        return done is not None

    async def _settle(
        self, task_type: str, acks: Sequence[bytes], delays: Sequence[tuple[uuid.UUID, int]],
        dead: Sequence[tuple[str, str]], levels: Mapping[uuid.UUID, str] | None,
    ) -> bool:
        await self.streams.settle(task_type, acks, delays=delays, dead=dead, levels=levels)
        return True

    async def recorded(
        self,
        batch: Sequence[tuple[bytes, Outcome]],
        stored: Mapping[uuid.UUID, Recorded],
        unsettled: Collection[uuid.UUID],
        shutdown: Shutdown,
    ) -> bool:
        """Settle the messages of a recorded batch: retries scheduled and dead tasks
        dead-lettered as `stored` says; outcomes not stored were superseded (acked too),
        except those in `unsettled` (not recorded at all: left pending). False if given up at
        the drain deadline."""
        by_type: dict[str, list[tuple[bytes, Outcome]]] = defaultdict(list)
        for entry in batch:
            if entry[1].task_id not in unsettled:
                by_type[entry[1].task_type].append(entry)
        settled = True
        for task_type, entries in by_type.items():
            delays, dead, levels = [], [], {}
            for _, outcome in entries:
                r = stored.get(outcome.task_id)
                if r is None:
                    continue
                if r.status == "queued":
                    delays.append((r.task_id, int(r.run_at.timestamp() * 1000)))
                    if r.priority is not None:
                        levels[r.task_id] = r.priority
                elif r.status == "dead":
                    dead.append((str(r.task_id), outcome.error or "dead"))
            acks = [stream_id for stream_id, _ in entries]
            settled &= await self.settle(task_type, acks, delays=delays, dead=dead,
                                         levels=levels, shutdown=shutdown)
        return settled

    async def unrunnable(
        self,
        task_type: str,
        undecodable: Sequence[Message],
        duplicates: Sequence[Message],
        not_started: Sequence[NotStarted],
        by_task: Mapping[uuid.UUID, Message],
        shutdown: Shutdown,
    ) -> None:
        """Settle messages whose task is not runnable: ack them, re-delaying early ones and
        dead-lettering what cannot be decoded, has no task or no attempts left; leave those
        whose start Postgres refused pending. Never raises (but for cancellation): what
        cannot be settled stays pending."""
        try:
            await self._unrunnable(task_type, undecodable, duplicates, not_started, by_task,
                                   shutdown)
        except Exception:  # left pending: the rebalancer re-queues it once idle a TTL
            log.exception("settler.failed", task_type=task_type)

    async def _unrunnable(
        self,
        name: str,
        undecodable: Sequence[Message],
        duplicates: Sequence[Message],
        not_started: Sequence[NotStarted],
        by_task: Mapping[uuid.UUID, Message],
        shutdown: Shutdown,
    ) -> None:
        acks = [m.stream_id for m in [*undecodable, *duplicates]]
        dead = [("", f"{m.error} (stream entry {m.stream_id.decode()})") for m in undecodable]
        delays = []
        levels = {}
        exhausted = []
        if duplicates:
            metrics.MESSAGES_DROPPED.labels(name, "duplicate").inc(len(duplicates))
        for ns in not_started:
            if ns.refused is not None:
                log.warning("worker.start.refused", task_type=name, task_id=str(ns.id),
                            error=ns.refused)
                continue
            acks.append(by_task[ns.id].stream_id)
            if ns.status is None:
                dead.append((str(ns.id), "no such task in Postgres"))
                metrics.MESSAGES_DROPPED.labels(name, "unknown").inc()
            elif ns.exhausted:
                exhausted.append(ns.id)
            elif ns.status == "queued" and ns.run_at is not None:
                delays.append((ns.id, int(ns.run_at.timestamp() * 1000)))
                if ns.priority is not None:
                    levels[ns.id] = ns.priority
                metrics.MESSAGES_DROPPED.labels(name, "early").inc()
            else:
                metrics.MESSAGES_DROPPED.labels(name, ns.status).inc()
        for m in undecodable:
            metrics.DEAD_LETTERED.labels(name, "undecodable").inc()
            log.warning("consumer.message.undecodable", task_type=name, error=m.error)
        if exhausted:
            killed = await self._outage.until_done(self.store.kill, exhausted,
                                                   LAST_ATTEMPT_LOST, shutdown=shutdown)
            if killed is None:
                return
            for task_id in killed:
                dead.append((str(task_id), LAST_ATTEMPT_LOST))
                metrics.DEAD_LETTERED.labels(name, "attempts").inc()
            if self.publisher is not None:
                self.publisher.emit(*(event("dead", task_id, name, "dead",
                                            error=LAST_ATTEMPT_LOST) for task_id in killed))
        await self.settle(name, acks, delays=delays, dead=dead, levels=levels,
                          shutdown=shutdown)
