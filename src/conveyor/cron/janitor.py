"""Janitor: every interval, deletes finished tasks past their retention, trims streams of
acked entries, caps dead-letter streams and prunes stale workers' rows.  [janitor]

One process at a time runs a pass (the `janitor` lock, extended between batches). Deletion is
in batches of at most `batch` rows, each one short transaction under a lock timeout that locks
only the rows it deletes (SKIP LOCKED): enqueues and completions never wait behind it. A pass
is bounded in time too (a backlog left over is the next pass's); every pass logs one line with
its counts and sets the metrics (rows pruned, age of the oldest kept row per status).

A workflow is pruned whole (its row and every node), once its last node finished longer ago
than the longest of the global retentions (`CONVEYOR_RETENTION_*`; one of them 0 keeps
workflows forever): the per-type deletes leave workflow nodes alone.

Streams are also trimmed by every worker at each beat (worker/heartbeat.py), so a deployment
without a cron process keeps them bounded; here they are trimmed for types no worker runs.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

import structlog

from conveyor import metrics
from conveyor.config import Settings
from conveyor.cron._locked import LockedLoop
from conveyor.queue.connection import Redis
from conveyor.queue.keys import Keys
from conveyor.queue.streams import TaskStreams
from conveyor.registry import Retention
from conveyor.store.tasks import FINISHED, TaskStore
from conveyor.store.workers import Liveness
from conveyor.store.workflows import WorkflowStore

log = structlog.get_logger("conveyor.janitor")


@dataclass
class Pass:
    """What one pass did."""

    pruned: dict[str, int] = field(default_factory=dict)  # by finished status
    trimmed: int = 0  # acked stream entries dropped
    dead_letters_trimmed: int = 0
    workers_pruned: int = 0
    workflows_pruned: int = 0
    batches: int = 0
    longest_statement_s: float = 0.0
    statements_s: list[float] = field(default_factory=list)  # each DELETE's duration
    complete: bool = True  # False: stopped at its time budget, rows left for the next


class Janitor(LockedLoop):
    """Options: `retention` (a type's own, by name; others take `settings`'), `batch` (rows
    per DELETE), `budget_s` (longest pass), `lock_timeout_s` (per DELETE)."""

    name = "janitor"

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        streams: TaskStreams,
        store: TaskStore,
        types: list[str],
        *,
        liveness: Liveness,
        settings: Settings,
        retention: Mapping[str, Retention],
        interval_s: float,
        batch: int,
        lock_timeout_s: float,
        budget_s: float | None = None,
    ) -> None:
        super().__init__(redis, keys, streams, store, types, interval_s=interval_s)
        self.liveness = liveness
        self.settings = settings
        self.retention = dict(retention)
        self.batch = batch
        self.lock_timeout_s = lock_timeout_s
        # Well inside the lock's TTL, which is extended after every batch anyway.
        self.budget_s = budget_s if budget_s is not None else self.lock.ttl_ms / 1000 / 3
        self.last: Pass | None = None
        self.workflows = WorkflowStore(store)

    def workflows_kept_s(self) -> float:
        """Seconds a finished workflow is kept (0: forever): the longest any of its nodes
        could be kept, by the global settings or a type's own `retention`."""
        kept = [self.settings.retention_succeeded, self.settings.retention_cancelled,
                self.settings.retention_dead]
        for task_type in self.retention:
            kept.extend(self.kept_s(task_type).values())
        return 0.0 if any(k <= 0 for k in kept) else max(kept)

    def kept_s(self, task_type: str) -> dict[str, float]:
        """Seconds each finished status of `task_type` is kept (0: forever)."""
        return self.retention.get(task_type, Retention()).resolved(self.settings)

    async def tick(self) -> None:
        started = time.monotonic()
        done = Pass(pruned=dict.fromkeys(FINISHED, 0))
        present = await self.store.types_present()
        for task_type in dict.fromkeys([*self.types, *present]):
            if not await self.prune_type(task_type, done, deadline=started + self.budget_s):
                done.complete = False
                break
        kept = self.workflows_kept_s()
        while done.complete and kept > 0 and await self.lock.extend():
            pruned = await self.workflows.prune(kept, max(1, self.batch // 100))
            done.workflows_pruned += pruned
            if pruned < max(1, self.batch // 100) or time.monotonic() >= started + self.budget_s:
                break
        for task_type in self.types:
            acked = await self.streams.trim(task_type)
            capped = await self.streams.trim_dead(task_type, self.kept_s(task_type)["dead"])
            done.trimmed += acked
            done.dead_letters_trimmed += capped
            metrics.JANITOR_TRIMMED.labels(task_type, "tasks").inc(acked)
            metrics.JANITOR_TRIMMED.labels(task_type, "dead").inc(capped)
        done.workers_pruned = await self.liveness.prune()
        await self.observe(present)
        self.last = done
        log.info("janitor.pass", pruned=done.pruned, trimmed=done.trimmed,
                 dead_letters_trimmed=done.dead_letters_trimmed,
                 workers_pruned=done.workers_pruned, workflows_pruned=done.workflows_pruned,
                 batches=done.batches,
                 longest_statement_ms=round(done.longest_statement_s * 1000, 1),
                 complete=done.complete,
                 duration_ms=round((time.monotonic() - started) * 1000, 1))

    async def prune_type(self, task_type: str, done: Pass, *, deadline: float) -> bool:
        """Delete the type's expired finished tasks, batch by batch; False if the pass ran
        out of time (or lost its lock) first."""
        for status, kept in self.kept_s(task_type).items():
            if kept <= 0:
                continue
            while True:
                if time.monotonic() >= deadline or not await self.lock.extend():
                    return False
                batch = await self.store.prune(task_type, status,  # type: ignore[arg-type]
                                               kept, self.batch,
                                               lock_timeout_s=self.lock_timeout_s)
                done.batches += 1
                done.longest_statement_s = max(done.longest_statement_s, batch.duration_s)
                done.statements_s.append(batch.duration_s)
                metrics.JANITOR_STATEMENT.observe(batch.duration_s)
                if batch.ids:
                    done.pruned[status] += len(batch.ids)
                    metrics.JANITOR_PRUNED.labels(task_type, status).inc(len(batch.ids))
                if len(batch.ids) < self.batch:
                    break
        return True

    async def observe(self, task_types: list[str]) -> None:
        """Set the oldest-kept-row gauges (seconds since its finish; 0 when none is kept)."""
        now = datetime.now(UTC)
        for task_type in task_types:
            oldest = await self.store.oldest_finished(task_type)
            for status, at in oldest.items():
                age = max(0.0, (now - at).total_seconds()) if at is not None else 0.0
                metrics.JANITOR_OLDEST.labels(task_type, status).set(age)
