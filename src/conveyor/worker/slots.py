"""Slots: the process-wide limit on messages in flight (read and not yet acked).

Consumers take slots before they read, so XREADGROUP never asks for more messages than there
is room for, and give them back when a message is settled.
"""

from __future__ import annotations

import asyncio

from conveyor import metrics


class Slots:
    """`capacity` slots shared by every consumer of one worker."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.free = capacity
        self._available = asyncio.Event()
        self._available.set()
        self._closed = False

    @property
    def in_use(self) -> int:
        return self.capacity - self.free

    async def take(self, most: int) -> int:
        """Wait for at least one free slot and take up to `most`; 0 once closed."""
        while self.free == 0 and not self._closed:
            self._available.clear()
            await self._available.wait()
        if self._closed:
            return 0
        taken = min(self.free, most)
        self.free -= taken
        metrics.WORKER_IN_FLIGHT.set(self.in_use)
        return taken

    def give(self, count: int = 1) -> None:
        self.free += count
        metrics.WORKER_IN_FLIGHT.set(self.in_use)
        self._available.set()

    def close(self) -> None:
        """Stop handing out slots: consumers waiting in take() get 0 and stop reading."""
        self._closed = True
        self._available.set()
