"""Slots: take/give/close, and never more than `capacity` handed out."""

from __future__ import annotations

import asyncio
import random

from conveyor.worker.slots import Slots


async def test_take_up_to_what_is_free() -> None:
    slots = Slots(5)
    assert await slots.take(3) == 3
    assert (slots.free, slots.in_use) == (2, 3)
    assert await slots.take(10) == 2
    assert (slots.free, slots.in_use) == (0, 5)


async def test_give_returns_slots() -> None:
    slots = Slots(2)
    assert await slots.take(2) == 2
    slots.give()
    assert slots.free == 1
    slots.give(1)
    assert (slots.free, slots.in_use) == (2, 0)
    assert await slots.take(5) == 2


async def test_take_waits_until_a_slot_is_given() -> None:
    slots = Slots(1)
    assert await slots.take(1) == 1
    waiter = asyncio.create_task(slots.take(3))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    slots.give()
    assert await asyncio.wait_for(waiter, 1) == 1
    assert slots.free == 0


async def test_close_releases_waiters_with_zero() -> None:
    slots = Slots(1)
    await slots.take(1)
    waiters = [asyncio.create_task(slots.take(1)) for _ in range(3)]
    await asyncio.sleep(0.01)
    assert not any(w.done() for w in waiters)
    slots.close()
    assert await asyncio.wait_for(asyncio.gather(*waiters), 1) == [0, 0, 0]


async def test_take_after_close_is_zero_even_with_free_slots() -> None:
    slots = Slots(4)
    slots.close()
    assert await slots.take(2) == 0
    assert slots.free == 4


async def test_give_after_close_still_counts() -> None:
    slots = Slots(2)
    await slots.take(2)
    slots.close()
    slots.give(2)
    assert slots.in_use == 0


async def test_one_give_wakes_one_taker_per_slot() -> None:
    slots = Slots(2)
    await slots.take(2)
    waiters = [asyncio.create_task(slots.take(1)) for _ in range(3)]
    await asyncio.sleep(0.005)
    slots.give(1)
    await asyncio.sleep(0.005)
    assert sum(w.done() for w in waiters) == 1
    assert slots.free == 0
    slots.close()
    results = await asyncio.gather(*waiters)
    assert sorted(results) == [0, 0, 1]


async def test_never_more_than_capacity_across_concurrent_takers() -> None:
    capacity = 3
    slots = Slots(capacity)
    rng = random.Random(42)
    held = 0
    peak = 0
    handed_out = 0

    async def consumer() -> None:
        nonlocal held, peak, handed_out
        for _ in range(20):
            got = await slots.take(rng.randint(1, 3))
            assert got >= 1
            held += got
            handed_out += got
            peak = max(peak, held)
            assert held <= capacity
            assert slots.in_use == held
            await asyncio.sleep(0 if rng.random() < 0.5 else 0.0005)
            held -= got
            slots.give(got)

    await asyncio.wait_for(asyncio.gather(*(consumer() for _ in range(8))), 5)
    assert peak == capacity
    assert handed_out >= 160
    assert (slots.free, slots.in_use) == (capacity, 0)
