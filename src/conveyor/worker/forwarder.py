"""Forwarder: moves delayed tasks and retries whose time has come from each type's delayed set
to its stream, or a type with priorities to its level's ready set (an atomic script, so
several workers never move one twice).

It runs in every worker, like asynq's forwarder, so a worker alone serves delayed work.
"""

from __future__ import annotations

from collections.abc import Collection

import structlog

from conveyor.errors import Unavailable
from conveyor.queue.streams import TaskStreams
from conveyor.runtime.outage import Outage
from conveyor.runtime.shutdown import Shutdown

log = structlog.get_logger("conveyor.forwarder")


class Forwarder:
    """Every `interval_s`, forward due delayed tasks of `types`."""

    def __init__(
        self, streams: TaskStreams, types: list[str], *, interval_s: float, batch: int = 1000,
        ranked: Collection[str] = (),
    ) -> None:
        self.streams = streams
        self.types = types
        self.ranked = frozenset(ranked)  # types with priorities: due tasks to their ready sets
        self.interval_s = interval_s
        self.batch = batch
        self._outage = Outage("worker.forward")

    async def run(self, shutdown: Shutdown) -> None:
        """Forward until shutdown begins."""
        while not await shutdown.wait(self.interval_s):
            try:
                await self.tick()
                self._outage.recovered()
            except Unavailable as exc:
                self._outage.note(exc)

    async def tick(self) -> int:
        moved = 0
        for task_type in self.types:
            while True:
                n = await self.streams.forward(task_type, self.batch,
                                               ranked=task_type in self.ranked)
                moved += n
                if n < self.batch:
                    break
        return moved
