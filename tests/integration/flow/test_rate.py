"""Rate cells on a real Redis: a refund never frees cells another take counted on."""

from __future__ import annotations

import asyncio

from conveyor.queue.flow import FlowRedis
from conveyor.registry import parse_task_rate
from conveyor.state import AppState


async def test_a_refund_after_another_take_is_skipped(state: AppState) -> None:
    flow = FlowRedis(state.redis, state.keys)
    pace = state.keys.pace("rated")
    rate = parse_task_rate("2/s burst=5")  # a cell every 500 ms, 5 at once
    first = await flow.take(pace, rate, 3)
    assert first.taken == 3
    await asyncio.sleep(1.6)  # its cells have all come due meanwhile
    second = await flow.take(pace, rate, 5)
    assert second.taken == 5  # the whole burst, from now
    assert not await flow.refund(pace, rate, 3, first)  # its read came back empty, late
    third = await flow.take(pace, rate, 5)
    # the burst is spent: nothing more until a cell comes due (500 ms after the second take;
    # before the fix the refund freed 3)
    assert third.taken == 0
    # A refund right after its own take, with no take between, gives the cells back.
    other = state.keys.pace("rated", "tenant-1")
    fourth = await flow.take(other, rate, 2)
    assert fourth.taken == 2
    assert await flow.refund(other, rate, 2, fourth)
    assert (await flow.take(other, rate, 5)).taken == 5
