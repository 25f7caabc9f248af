"""`/metrics`: Prometheus text exposition of this process's metrics, plus the queue depth per
task type, read from Redis at scrape time."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence

import structlog
from fastapi import APIRouter, Depends, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

from conveyor import metrics as meters
from conveyor.api.auth import forbidden, metrics_access
from conveyor.errors import Unavailable
from conveyor.queue.streams import TaskStreams
from conveyor.store.keys import READ

router = APIRouter(tags=["health"])
log = structlog.get_logger("conveyor.api")
READ_TIMEOUT_S = 1.0


class QueueDepth:
    """Sets `conveyor_queue_depth` from one Redis pipeline (four commands per type), at most
    once per `max_age_s` however often, and by however many scrapers, `/metrics` is read.

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
            except (Unavailable, TimeoutError) as exc:
                meters.QUEUE_DEPTH.clear()
                log.warning("metrics.queue_depth.unavailable", error=str(exc) or "timed out")
                return
            finally:
                self._read_at = self.clock()
            meters.QUEUE_DEPTH.clear()
            for task_type, s in stats.items():
                if s.undelivered is not None:
                    meters.QUEUE_DEPTH.labels(task_type, "undelivered").set(s.undelivered)
                meters.QUEUE_DEPTH.labels(task_type, "delayed").set(s.delayed)
                meters.QUEUE_DEPTH.labels(task_type, "pending").set(s.pending)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            dependencies=[Depends(metrics_access)], responses=forbidden(READ))
async def metrics(request: Request) -> Response:
    depth: QueueDepth = request.app.state.queue_depth
    await depth.refresh()
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
