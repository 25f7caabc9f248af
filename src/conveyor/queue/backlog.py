"""Backlog: the per-type queue gauges (`conveyor_queue_depth`, `conveyor_queue_lag`,
`conveyor_queue_oldest_age_seconds`), read from Redis when metrics are scraped.  [metrics]

The one owner of these readings: the API's `/metrics` and the metrics port of `worker` and
`cron` processes (and of a multi-process worker's supervisor) all refresh through it.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence

import structlog

from conveyor import metrics as meters
from conveyor.errors import Unavailable
from conveyor.queue.streams import TaskStreams

log = structlog.get_logger("conveyor.metrics")
READ_TIMEOUT_S = 1.0


class Backlog:
    """Sets the backlog gauges from three Redis pipelines (a few commands per type), at most
    once per `max_age_s` however often, and by however many scrapers, metrics are read.

    When Redis does not answer within `READ_TIMEOUT_S` the series are removed rather than left
    stale, and the scrape still succeeds with every other metric.
    """

    def __init__(
        self, streams: TaskStreams, task_types: Sequence[str], max_age_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.streams = streams
        self.task_types = list(task_types)
        self.max_age_s = max_age_s
        self.clock = clock
        self.reads = 0
        self._read_at = -math.inf
        self._lock = asyncio.Lock()  # one read at a time; the others wait and reuse it

    def _fresh(self) -> bool:
        return self.clock() - self._read_at < self.max_age_s

    async def refresh(self) -> None:
        if self._fresh():
            return
        async with self._lock:
            if self._fresh():
                return
            self.reads += 1
            try:
                async with asyncio.timeout(READ_TIMEOUT_S):
                    stats = await self.streams.stats(self.task_types)
                    ages = await self.streams.oldest_undelivered_age_ms(self.task_types)
            except (Unavailable, TimeoutError) as exc:
                for gauge in meters.BACKLOG:
                    gauge.clear()
                log.warning("metrics.backlog.unavailable", error=str(exc) or "timed out")
                return
            finally:
                self._read_at = self.clock()
            for gauge in meters.BACKLOG:
                gauge.clear()
            for task_type, s in stats.items():
                if s.undelivered is not None:
                    meters.QUEUE_DEPTH.labels(task_type, "undelivered").set(s.undelivered)
                meters.QUEUE_DEPTH.labels(task_type, "delayed").set(s.delayed)
                meters.QUEUE_DEPTH.labels(task_type, "pending").set(s.pending)
                lag = s.undelivered + s.pending if s.undelivered is not None else s.length
                meters.QUEUE_LAG.labels(task_type).set(lag)
                age_ms = ages.get(task_type)
                meters.QUEUE_OLDEST_AGE.labels(task_type).set((age_ms or 0) / 1000)
