"""Slots: the process-wide limit on messages in flight (read and not yet acked).

Consumers take slots before they read, so XREADGROUP never asks for more messages than there
is room for, and give them back when a message is settled. Slots go to waiting consumers in
arrival order: a consumer that gives a slot back and asks again queues behind the others, so
no stream starves. `wait_quiet()` lets an idle consumer stand aside while others need slots.
"""

from __future__ import annotations

import asyncio
import collections

from conveyor import metrics


class Slots:
    """`capacity` slots shared by every consumer of one worker."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.free = capacity
        self._waiters: collections.deque[tuple[asyncio.Future[int], int]] = collections.deque()
        self._closed = False
        self._quiet = asyncio.Event()  # set while a slot is free and nobody waits for one
        self._quiet.set()
        metrics.WORKER_IN_FLIGHT.set_function(lambda: self.in_use)  # read at scrape time

    @property
    def in_use(self) -> int:
        return self.capacity - self.free

    @property
    def waiting(self) -> int:
        """Consumers queued for a slot."""
        return len(self._waiters)

    async def take(self, most: int) -> int:
        """Wait for at least one free slot and take up to `most`; 0 once closed."""
        if self._closed:
            return 0
        if self.free > 0 and not self._waiters:
            return self._hand(most)
        waiter: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiters.append((waiter, most))
        self._quiet.clear()
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.give(waiter.result())
            else:
                self._waiters = collections.deque(w for w in self._waiters if w[0] is not waiter)
                if self.free > 0 and not self._waiters:
                    self._quiet.set()
            raise

    def _hand(self, most: int) -> int:
        taken = min(self.free, most)
        self.free -= taken
        if self.free == 0:
            self._quiet.clear()
        return taken

    async def wait_quiet(self, timeout_s: float) -> bool:
        """Wait until a slot is free with nobody queued for it; False after `timeout_s`."""
        if self._quiet.is_set() or self._closed:
            return True
        try:
            async with asyncio.timeout(timeout_s):
                await self._quiet.wait()
        except TimeoutError:
            return False
        return True

    def give(self, count: int = 1) -> None:
        if count <= 0:
            return
        self.free += count
        while self._waiters and self.free > 0:
            waiter, most = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(self._hand(most))
        if self.free > 0 and not self._waiters:
            self._quiet.set()

    def close(self) -> None:
        """Stop handing out slots: consumers waiting in take() get 0 and stop reading."""
        self._closed = True
        self._quiet.set()
        while self._waiters:
            waiter, _ = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(0)
