"""Progress: what handlers report with `ctx.progress()`, kept latest-only per attempt and
written every `interval_s` in one statement (and one batch of events), so a handler calling it
in a tight loop costs a dict assignment.

Reports come from the loop, from handler threads and from the process pool's relay thread;
the table they land in is guarded by a lock.
"""

from __future__ import annotations

import threading
import uuid
from typing import Any

import orjson
import structlog

from conveyor.errors import Unavailable
from conveyor.queue.events import Publisher, event
from conveyor.runtime.shutdown import Shutdown
from conveyor.store.tasks import TaskStore

log = structlog.get_logger("conveyor.progress")


class Progress:
    """Latest progress per (task id, attempt), flushed to Postgres and the events stream."""

    def __init__(self, store: TaskStore, publisher: Publisher, worker_id: str, *,
                 interval_s: float, types: dict[str, str] | None = None) -> None:
        self.store = store
        self.publisher = publisher
        self.worker_id = worker_id
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._latest: dict[tuple[str, int], dict[str, Any]] = {}
        self._types: dict[str, str] = types if types is not None else {}

    def running(self, task_id: str, task_type: str) -> None:
        """Note a task's type, for its progress events."""
        self._types[task_id] = task_type

    def done(self, task_id: str) -> None:
        self._types.pop(task_id, None)

    def report(self, task_id: str, attempt: int, progress: dict[str, Any]) -> None:
        """A handler's report (any thread): replaces the one not yet written."""
        with self._lock:
            self._latest[(task_id, attempt)] = progress

    async def run(self, stop: Shutdown) -> None:
        while not await stop.wait(self.interval_s):
            await self.flush()
        await self.flush()

    async def flush(self) -> None:
        with self._lock:
            latest, self._latest = self._latest, {}
        if not latest:
            return
        rows = [(uuid.UUID(task_id), attempt, orjson.dumps(p).decode())
                for (task_id, attempt), p in latest.items()]
        self.publisher.emit(*(
            event("progress", task_id, self._types.get(task_id, ""), "running",
                  attempt=attempt, progress=p)
            for (task_id, attempt), p in latest.items()
        ))
        try:
            await self.store.write_progress(rows, self.worker_id)
        except Unavailable as exc:  # the next report writes it; the events went out
            log.warning("progress.write.failed", reports=len(rows), error=str(exc))
