"""Coalescer: concurrent calls share flushes; batch size bounded by weight; errors reach each
caller of the batch that failed."""

from __future__ import annotations

import asyncio

import pytest

from conveyor.runtime.coalescer import Coalescer


async def test_calls_made_while_a_flush_runs_share_the_next_one() -> None:
    flushes: list[list[int]] = []

    async def flush(items: list[int]) -> list[int]:
        flushes.append(items)
        await asyncio.sleep(0.01)
        return [i * 10 for i in items]

    coalescer: Coalescer[int, int] = Coalescer(flush)
    results = await asyncio.gather(*(coalescer.submit(i) for i in range(5)))
    assert results == [0, 10, 20, 30, 40]
    assert flushes == [[0, 1, 2, 3, 4]]
    first = asyncio.ensure_future(coalescer.submit(5))
    await asyncio.sleep(0.001)  # its flush is under way: the next calls wait for it, together
    later = await asyncio.gather(*(coalescer.submit(i) for i in (6, 7)))
    assert (await first, later) == (50, [60, 70])
    assert flushes[1:] == [[5], [6, 7]]


async def test_a_batch_is_bounded_by_the_summed_weight() -> None:
    flushes: list[list[list[int]]] = []

    async def flush(items: list[list[int]]) -> list[int]:
        flushes.append(items)
        await asyncio.sleep(0)
        return [len(i) for i in items]

    coalescer: Coalescer[list[int], int] = Coalescer(flush, max_batch=5, weight=len)
    sizes = [1, 3, 2, 4, 7, 1]
    results = await asyncio.gather(*(coalescer.submit([0] * n) for n in sizes))
    assert results == sizes
    # 1+3 fit in 5; 2 would make 6, so it opens the next batch; 7 alone exceeds it but goes.
    assert [[len(i) for i in batch] for batch in flushes] == [[1, 3], [2], [4], [7], [1]]


async def test_an_error_reaches_every_caller_of_its_batch_only() -> None:
    async def flush(items: list[int]) -> list[int]:
        await asyncio.sleep(0)
        if 13 in items:
            raise ValueError("unlucky")
        return items

    coalescer: Coalescer[int, int] = Coalescer(flush)
    assert await coalescer.submit(1) == 1
    unlucky = [asyncio.ensure_future(coalescer.submit(i)) for i in (12, 13)]
    for call in unlucky:
        with pytest.raises(ValueError, match="unlucky"):
            await call
    assert await coalescer.submit(2) == 2
