"""Rate cells on a real Redis: a refund never frees cells another take counted on; paced starts
count from when the cells' answer arrived."""

from __future__ import annotations

import asyncio
import time
from typing import Any, cast

from conveyor.queue.flow import Allowance, FlowRedis
from conveyor.registry import parse_task_rate
from conveyor.runtime.shutdown import Shutdown
from conveyor.state import AppState
from conveyor.store.queue_settings import QueueSettingsStore
from conveyor.worker.consumer import Consumer
from conveyor.worker.gate import Gate
from conveyor.worker.slots import Slots


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


class _LateReply(Gate):
    """A gate whose answer arrives 0.2 s after Redis took the cells (a slow network, a busy
    loop)."""

    async def admit(self, task_type: str, want: int
                    ) -> tuple[int, float, str | None, Allowance | None]:
        answer = await super().admit(task_type, want)
        await asyncio.sleep(0.2)
        return answer


async def test_paced_starts_count_from_the_reply_not_the_request(state: AppState) -> None:
    rated = state.app.registry.types["rated"]
    gate = _LateReply([rated], FlowRedis(state.redis, state.keys),
                      QueueSettingsStore(state.pool, state.settings.database_schema), "w1",
                      lease_ttl_s=10, reload_s=5, poll_s=0.05, defer_s=0.5)
    consumer = Consumer(rated, worker_id="w1", streams=state.streams, slots=Slots(5),
                        dispatcher=cast(Any, None), spawn=lambda _: None, block_ms=100,
                        solo=True, gate=gate)
    asked = time.monotonic()
    granted, cells = await consumer._admit(5, Shutdown(1.0))
    assert granted >= 1
    assert cells is not None
    counted_from, _ = cells
    print(f"cells counted from {counted_from - asked:.3f} s after the request")
    assert counted_from >= asked + 0.2  # the first start is not 0.2 s early


async def test_a_reload_wakes_every_type_waiting_or_about_to_wait(state: AppState) -> None:
    types = [state.app.registry.types[t] for t in ("rated", "limited")]
    gate = Gate(types, FlowRedis(state.redis, state.keys),
                QueueSettingsStore(state.pool, state.settings.database_schema), "w1",
                lease_ttl_s=10, reload_s=5, poll_s=0.05, defer_s=0.5)
    for t in ("rated", "limited"):
        await gate.admit(t, 1)
    waiting = asyncio.create_task(gate.wait("rated", 5.0))
    await asyncio.sleep(0.05)
    await gate.reload()
    await asyncio.wait_for(waiting, 1.0)  # woken by the reload
    # `limited` was busy during the reload; its wait after it does not sleep through it,
    # although `rated` waited (and, before, cleared the shared event) meanwhile.
    await gate.admit("rated", 1)
    again = asyncio.create_task(gate.wait("rated", 5.0))
    await asyncio.sleep(0.05)
    await asyncio.wait_for(gate.wait("limited", 5.0), 1.0)
    again.cancel()


async def test_a_burst_lets_that_many_go_at_once_then_spaces_them(state: AppState) -> None:
    flow = FlowRedis(state.redis, state.keys)
    pace = state.keys.pace("rated", "burst")
    rate = parse_task_rate("2/s burst=4")  # a cell every 500 ms, 4 at once after a quiet spell
    assert (await flow.take(pace, rate, 10)).taken == 4
    spent = await flow.take(pace, rate, 10)
    assert spent.taken == 0
    assert 0 < spent.retry_after_s <= 0.5  # the next cell, at most one interval on
    await asyncio.sleep(spent.retry_after_s + 0.05)
    # one at a time from then on (two if this sleep overran by an interval: not a burst)
    assert (await flow.take(pace, rate, 10)).taken in (1, 2)
