"""Slots: take/give/close, first-come first-served hand-over, and never more than `capacity`
handed out."""

from __future__ import annotations

import asyncio
import random

import pytest

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


async def test_give_nothing_is_a_no_op() -> None:
    slots = Slots(2)
    await slots.take(1)
    slots.give(0)
    assert slots.free == 1


async def test_take_waits_until_a_slot_is_given() -> None:
    slots = Slots(1)
    assert await slots.take(1) == 1
    waiter = asyncio.create_task(slots.take(3))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    assert slots.waiting == 1
    slots.give()
    assert await asyncio.wait_for(waiter, 1) == 1
    assert slots.free == 0
    assert slots.waiting == 0


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


async def test_one_give_serves_one_waiter_per_slot() -> None:
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


async def test_waiters_are_served_in_arrival_order() -> None:
    slots = Slots(1)
    order: list[str] = []
    go = asyncio.Event()

    async def taker(name: str) -> None:
        got = await slots.take(1)
        order.append(name)
        await asyncio.sleep(0.001)
        slots.give(got)

    async def holder() -> None:
        got = await slots.take(1)
        await go.wait()
        # gives its slot back and at once asks again: it queues behind b and c
        slots.give(got)
        again = await slots.take(1)
        order.append("a")
        slots.give(again)

    first = asyncio.create_task(holder())
    await asyncio.sleep(0)
    assert slots.in_use == 1
    others = [asyncio.create_task(taker("b")), asyncio.create_task(taker("c"))]
    await asyncio.sleep(0)
    assert slots.waiting == 2
    go.set()
    await asyncio.wait_for(asyncio.gather(first, *others), 1)
    assert order == ["b", "c", "a"]
    assert slots.free == 1


async def test_cancelled_waiter_that_was_handed_slots_gives_them_back() -> None:
    slots = Slots(1)
    await slots.take(1)
    waiter = asyncio.create_task(slots.take(1))
    await asyncio.sleep(0)
    slots.give(1)  # handed to the waiter, which has not resumed yet
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert slots.free == 1
    assert await slots.take(1) == 1


async def test_cancelled_waiter_does_not_swallow_slots() -> None:
    slots = Slots(1)
    await slots.take(1)
    cancelled = asyncio.create_task(slots.take(1))
    await asyncio.sleep(0)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    other = asyncio.create_task(slots.take(1))
    await asyncio.sleep(0)
    slots.give(1)
    assert await asyncio.wait_for(other, 1) == 1
    assert slots.in_use == 1


async def test_wait_quiet() -> None:
    slots = Slots(1)
    assert await slots.wait_quiet(0.01) is True
    await slots.take(1)
    assert await slots.wait_quiet(0.01) is False
    loop = asyncio.get_running_loop()
    loop.call_later(0.005, slots.give, 1)
    assert await slots.wait_quiet(1.0) is True


async def test_wait_quiet_is_false_while_someone_waits() -> None:
    slots = Slots(1)
    await slots.take(1)
    waiter = asyncio.create_task(slots.take(1))
    await asyncio.sleep(0)
    slots.give(1)  # goes to the waiter: still no free slot
    assert await slots.wait_quiet(0.01) is False
    assert await waiter == 1
    slots.close()
    assert await slots.wait_quiet(0.01) is True


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
            # slots handed to a waiter that has not resumed yet count as in use, not held
            assert held <= slots.in_use <= capacity
            assert slots.free >= 0
            await asyncio.sleep(0 if rng.random() < 0.5 else 0.0005)
            held -= got
            slots.give(got)

    await asyncio.wait_for(asyncio.gather(*(consumer() for _ in range(8))), 5)
    assert peak == capacity
    assert handed_out >= 160
    assert (slots.free, slots.in_use, slots.waiting) == (capacity, 0, 0)
