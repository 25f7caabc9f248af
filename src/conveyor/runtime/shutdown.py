"""Shutdown: the one stop signal every service watches, plus the drain deadline.  [watch channel]

`begin()` starts a graceful stop (no new work, finish what is in hand within `drain_timeout_s`);
`force()` ends the grace at once (a second Ctrl+C). Both are idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import structlog

log = structlog.get_logger("conveyor.shutdown")


class Shutdown:
    """A broadcast stop signal with a drain deadline."""

    def __init__(self, drain_timeout_s: float = 30.0) -> None:
        self.drain_timeout_s = drain_timeout_s
        self.reason: str | None = None
        self._begun = asyncio.Event()
        self._forced = asyncio.Event()
        self._deadline: float | None = None
        self._on_begin: list[Callable[[], object]] = []

    @property
    def begun(self) -> bool:
        return self._begun.is_set()

    @property
    def forced(self) -> bool:
        return self._forced.is_set()

    def begin(self, reason: str = "requested") -> None:
        """Start a graceful stop; later calls keep the first reason and deadline."""
        if self._begun.is_set():
            return
        self.reason = reason
        self._deadline = time.monotonic() + self.drain_timeout_s
        self._begun.set()
        callbacks, self._on_begin = self._on_begin, []
        for callback in callbacks:
            try:
                callback()
            except Exception:  # the others must still be woken, the stop still begun
                log.exception("shutdown.callback.failed")

    def force(self, reason: str = "forced") -> None:
        """Give up draining now: in-flight work is abandoned and stays pending in Redis."""
        self.begin(reason)
        self._forced.set()

    async def wait(self, timeout: float | None = None) -> bool:
        """Wait until shutdown begins or `timeout` passes; True once it has begun."""
        if self._begun.is_set():
            return True
        if timeout is None:
            await self._begun.wait()
            return True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._begun.wait()
        return self._begun.is_set()

    def when_begun(self, callback: Callable[[], object]) -> None:
        """Call `callback` when shutdown begins (now, if it has): a loop that sleeps on an
        event of its own is woken by it, without a task per sleep to watch this one."""
        if self._begun.is_set():
            callback()
        else:
            self._on_begin.append(callback)

    async def wait_forced(self) -> None:
        await self._forced.wait()

    def drain_remaining(self) -> float:
        """Seconds left of the drain budget (the full budget before shutdown begins)."""
        if self.forced:
            return 0.0
        if self._deadline is None:
            return self.drain_timeout_s
        return max(0.0, self._deadline - time.monotonic())
