"""Slots: take/give/close, first-come first-served hand-over, slots freed together split among
the waiters, idle reads that hold no slot, and never more than `capacity` handed out."""

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


async def test_cancelled_waiter_handed_slots_in_a_split_gives_them_back() -> None:
    slots = Slots(2)
    await slots.take(2)
    waiters = [asyncio.create_task(slots.take(1)) for _ in range(2)]
    await asyncio.sleep(0)
    slots.give(1)  # two wait: handed out on the loop's next turn
    await asyncio.sleep(0)
    assert slots.free == 0  # handed to the first waiter, which has not resumed yet
    waiters[0].cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiters[0]
    assert await asyncio.wait_for(waiters[1], 1) == 1  # given back, and on to the next
    assert slots.free == 0


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


async def test_slots_freed_together_are_split_among_waiters() -> None:
    slots = Slots(6)
    await slots.take(6)
    first = asyncio.create_task(slots.take(6))
    second = asyncio.create_task(slots.take(6))
    await asyncio.sleep(0)
    for _ in range(5):  # handlers ending in one turn of the loop
        slots.give(1)
    # the first waiter does not get all five, to take them all again turn after turn
    assert list(await asyncio.wait_for(asyncio.gather(first, second), 1)) == [3, 2]
    assert (slots.free, slots.waiting) == (0, 0)


async def test_the_odd_slot_of_a_split_goes_round() -> None:
    slots = Slots(3)
    await slots.take(3)
    grants: list[list[int]] = []
    for _ in range(2):
        first = asyncio.create_task(slots.take(3))
        second = asyncio.create_task(slots.take(3))
        await asyncio.sleep(0)
        slots.give(3)
        grants.append(list(await asyncio.wait_for(asyncio.gather(first, second), 1)))
    assert grants == [[2, 1], [1, 2]]


async def test_a_split_gives_no_waiter_more_than_it_asked_for() -> None:
    slots = Slots(6)
    await slots.take(6)
    small = asyncio.create_task(slots.take(1))
    large = asyncio.create_task(slots.take(6))
    await asyncio.sleep(0)
    slots.give(6)
    assert list(await asyncio.wait_for(asyncio.gather(small, large), 1)) == [1, 5]
    assert slots.free == 0


async def test_a_split_short_of_slots_serves_the_oldest_and_keeps_the_rest_queued() -> None:
    slots = Slots(3)
    await slots.take(3)
    waiters = [asyncio.create_task(slots.take(2)) for _ in range(3)]
    await asyncio.sleep(0)
    slots.give(2)
    await asyncio.sleep(0.005)
    assert [w.done() for w in waiters] == [True, True, False]
    assert [w.result() for w in waiters[:2]] == [1, 1]
    assert slots.waiting == 1
    slots.give(1)
    assert await asyncio.wait_for(waiters[2], 1) == 1


async def test_a_lone_waiter_is_served_at_once() -> None:
    slots = Slots(2)
    await slots.take(2)
    waiter = asyncio.create_task(slots.take(2))
    await asyncio.sleep(0)
    slots.give(1)
    assert slots.free == 0  # handed over in give(), not on a later turn
    slots.give(1)  # nobody waits any more: it stays free for the next take
    assert await waiter == 1
    assert slots.free == 1


async def test_busy_consumers_share_the_slots_evenly() -> None:
    """Two consumers that always have work, each taking what it can and running a handler per
    slot (handlers of one batch end together): over many rounds both run about as many."""
    slots = Slots(5)
    runs = {"a": 0, "b": 0}
    handlers: list[asyncio.Task[None]] = []

    async def handler(name: str) -> None:
        await asyncio.sleep(0.002)
        runs[name] += 1
        slots.give(1)

    async def consumer(name: str) -> None:
        while sum(runs.values()) < 300:
            got = await slots.take(5)
            await asyncio.sleep(0)  # the read
            handlers.extend(asyncio.create_task(handler(name)) for _ in range(got))

    await asyncio.wait_for(asyncio.gather(consumer("a"), consumer("b")), 10)
    await asyncio.gather(*handlers)
    assert min(runs.values()) >= 0.45 * sum(runs.values())


async def test_idle_runs_the_read_without_holding_a_slot() -> None:
    slots = Slots(1)

    async def read() -> str:
        assert slots.free == 1
        await asyncio.sleep(0.005)
        return "arrived"

    assert await slots.idle(read()) == "arrived"
    assert slots.free == 1


async def test_close_cuts_idle_reads_short() -> None:
    slots = Slots(1)
    began, cancelled = asyncio.Event(), asyncio.Event()

    async def read() -> str:
        began.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "arrived"

    idle = [asyncio.create_task(slots.idle(read())) for _ in range(3)]
    await asyncio.wait_for(began.wait(), 1)
    slots.close()
    assert await asyncio.wait_for(asyncio.gather(*idle), 1) == [None, None, None]
    assert cancelled.is_set()


async def test_idle_after_close_does_not_read() -> None:
    slots = Slots(1)
    slots.close()
    began = False

    async def read() -> str:
        nonlocal began
        began = True
        return "arrived"

    assert await slots.idle(read()) is None
    assert not began


async def test_idle_raises_what_the_read_raises() -> None:
    slots = Slots(1)

    async def read() -> None:
        raise RuntimeError("redis away")

    with pytest.raises(RuntimeError, match="redis away"):
        await slots.idle(read())


async def test_cancelling_the_caller_of_idle_cancels_the_read_and_raises() -> None:
    slots = Slots(1)
    began, cancelled = asyncio.Event(), asyncio.Event()

    async def read() -> None:
        began.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    idle = asyncio.create_task(slots.idle(read()))
    await asyncio.wait_for(began.wait(), 1)
    idle.cancel()
    slots.close()  # closing too does not turn the caller's own cancellation into None
    with pytest.raises(asyncio.CancelledError):
        await idle
    assert cancelled.is_set()


async def _gathering(slots: Slots, most: int, within_s: float
                     ) -> tuple[Slots, asyncio.Task[int]]:
    """Every slot taken, then a gather of `most` begun (not yet done)."""
    assert await slots.take(slots.capacity) == slots.capacity
    gathering = asyncio.create_task(slots.gather(most, within_s=within_s))
    await asyncio.sleep(0)
    assert not gathering.done()
    return slots, gathering


async def test_gather_takes_slots_as_they_come_free_until_it_has_them_all() -> None:
    slots, gathering = await _gathering(Slots(4), 3, within_s=10)
    for _ in range(3):
        await asyncio.sleep(0.01)
        assert not gathering.done()
        slots.give()
    assert await asyncio.wait_for(gathering, 1) == 3  # long before its 10 s
    assert (slots.free, slots.in_use) == (0, 4)


async def test_gather_returns_what_it_has_when_the_time_is_up() -> None:
    slots, gathering = await _gathering(Slots(4), 3, within_s=1)
    await asyncio.sleep(0.01)
    slots.give()
    assert await asyncio.wait_for(gathering, 5) == 1
    assert (slots.free, slots.in_use) == (0, 4)
    slots.give()  # after the time was up: not taken
    assert slots.free == 1


async def test_gather_takes_what_is_free_at_once_without_waiting() -> None:
    slots = Slots(4)
    assert await slots.take(2) == 2
    assert await slots.gather(3, within_s=0) == 2  # short of 3, and no wait for the third
    slots.give()
    assert slots.free == 1  # not taken by a gathering that is over


async def test_gather_ends_when_the_slots_close() -> None:
    slots, gathering = await _gathering(Slots(2), 2, within_s=10)
    await asyncio.sleep(0.01)
    slots.give()
    await asyncio.sleep(0.01)
    slots.close()
    assert await asyncio.wait_for(gathering, 1) == 1


async def test_a_cancelled_gather_gives_back_what_it_took() -> None:
    slots, gathering = await _gathering(Slots(4), 3, within_s=10)
    await asyncio.sleep(0.01)
    slots.give()
    gathering.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gathering
    assert (slots.free, slots.in_use) == (1, 3)


async def test_a_gather_cancelled_after_it_completed_but_before_it_resumed_loses_nothing(
) -> None:
    slots, gathering = await _gathering(Slots(4), 2, within_s=10)
    await asyncio.sleep(0.01)
    slots.give()
    slots.give()  # it has both: done, not yet resumed ...
    gathering.cancel()  # ... when it is cancelled
    with pytest.raises(asyncio.CancelledError):
        await gathering
    assert (slots.free, slots.in_use) == (2, 2)


async def test_gather_stops_when_another_consumer_waits_for_slots() -> None:
    slots, gathering = await _gathering(Slots(4), 3, within_s=10)
    await asyncio.sleep(0.01)
    slots.give()
    await asyncio.sleep(0.01)
    other = asyncio.create_task(slots.take(4))
    await asyncio.sleep(0.01)
    assert gathering.done()  # it reads with what it has as soon as the other waits
    assert await gathering == 1
    assert not other.done()
    slots.give()  # to the other, not to a gathering that ended
    assert await asyncio.wait_for(other, 1) == 1


async def test_one_consumer_gathers_at_a_time() -> None:
    slots = Slots(4)
    assert await slots.take(3) == 3
    first = asyncio.create_task(slots.gather(3, within_s=10))
    await asyncio.sleep(0.01)
    assert await asyncio.wait_for(slots.gather(3, within_s=10), 1) == 0  # at once
    slots.give(3)
    assert await asyncio.wait_for(first, 1) == 3
