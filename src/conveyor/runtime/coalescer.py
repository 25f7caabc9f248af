"""Coalescer: concurrent calls become batches. Calls that arrive while one batch is being
flushed form the next, so under load one round trip serves many callers and at rest a call
is flushed at once (no timer, no added latency). One flush runs at a time."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

I = TypeVar("I")  # noqa: E741 - item
R = TypeVar("R")


class Coalescer(Generic[I, R]):
    """`await submit(item)` returns `flush([..., item, ...])[position of item]`."""

    def __init__(
        self,
        flush: Callable[[list[I]], Awaitable[list[R]]],
        *,
        max_batch: int = 1000,
        weight: Callable[[I], int] = lambda item: 1,
    ) -> None:
        """`max_batch` bounds the summed `weight` of a batch (at least one item per batch)."""
        self.flush = flush
        self.max_batch = max_batch
        self.weight = weight
        self._pending: list[tuple[I, asyncio.Future[R]]] = []
        self._flushing = False
        self._drainer: asyncio.Future[None] | None = None

    async def submit(self, item: I) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if not self._flushing:
            self._flushing = True
            self._drainer = asyncio.ensure_future(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self._pending:
                size, total = 0, 0
                for item, _ in self._pending:
                    total += self.weight(item)
                    if size and total > self.max_batch:
                        break
                    size += 1
                batch = self._pending[:size]
                del self._pending[:size]
                try:
                    results = await self.flush([item for item, _ in batch])
                except Exception as exc:  # every caller of the batch gets the error
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), result in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(result)
        finally:
            self._flushing = False
