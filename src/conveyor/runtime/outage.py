"""Outage: backoff between attempts while Postgres or Redis is away, logged once per outage.

    outage = Outage("worker.read")
    try: ...; outage.recovered()
    except Unavailable as exc: await outage.failed(exc, shutdown)
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import structlog

from conveyor import metrics
from conveyor.errors import Unavailable
from conveyor.runtime.shutdown import Shutdown

log = structlog.get_logger("conveyor.outage")
T = TypeVar("T")


class Outage:
    """Tracks one component's connection trouble: exponential backoff with jitter, one warning
    when it starts and one info line when it ends."""

    def __init__(self, component: str, *, base_s: float = 0.1, cap_s: float = 5.0) -> None:
        self.component = component
        self.base_s = base_s
        self.cap_s = cap_s
        self.failures = 0
        self._since: float | None = None

    @property
    def ongoing(self) -> bool:
        return self._since is not None

    def next_delay_s(self) -> float:
        raw = min(self.cap_s, self.base_s * 2 ** min(max(0, self.failures - 1), 64))
        return float(raw / 2 + random.random() * raw / 2)

    def note(self, exc: Unavailable) -> None:
        """Count a failure; the first of an outage is logged."""
        self.failures += 1
        if self._since is None:
            self._since = time.monotonic()
            metrics.OUTAGES.labels(self.component).inc()
            log.warning("outage.started", component=self.component, op=exc.op, error=exc.detail)

    async def failed(self, exc: Unavailable, shutdown: Shutdown | None = None) -> None:
        """Note a failure and wait the backoff delay (less if shutdown begins)."""
        self.note(exc)
        delay = self.next_delay_s()
        if shutdown is None:
            await asyncio.sleep(delay)
        else:
            await shutdown.wait(delay)

    async def until_done(
        self, step: Callable[..., Awaitable[T]], *args: Any, shutdown: Shutdown
    ) -> T | None:
        """`await step(*args)` again and again while it raises Unavailable (with backoff);
        None once shutdown has begun and its drain deadline has passed."""
        while True:
            try:
                result = await step(*args)
            except Unavailable as exc:
                if shutdown.begun and shutdown.drain_remaining() <= 0:
                    return None
                await self.failed(exc)
                continue
            self.recovered()
            return result

    def recovered(self) -> None:
        """Note a success; logs the end of an outage if one was going on."""
        if self._since is not None:
            log.info(
                "outage.ended", component=self.component,
                duration_s=round(time.monotonic() - self._since, 3), attempts=self.failures,
            )
        self._since = None
        self.failures = 0
