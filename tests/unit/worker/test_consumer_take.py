"""A consumer's slots for its next read: at once after a short read (an idle stream never
waits for the linger), gathered after a full one until it holds as many as that read carried
(not the slots longer handlers hold), none once shutdown closed the slots while it gathered
(no new read), none lost when it is cancelled meanwhile, and no gathering under flow limits."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any, cast

import pytest

from conveyor.worker.consumer import Consumer
from conveyor.worker.slots import Slots
from tests.apps import fair


def _consumer(slots: Slots, linger_s: float, *, limited: bool | None = None) -> Consumer:
    gate = None if limited is None else SimpleNamespace(
        of=lambda _name: SimpleNamespace(limited=limited))
    return Consumer(fair.app.registry.types["busy"], worker_id="w1", streams=cast(Any, None),
                    slots=slots, dispatcher=cast(Any, None), spawn=lambda _: None,
                    block_ms=100, solo=True, linger_s=linger_s, gate=cast(Any, gate))


async def test_after_a_short_read_it_reads_with_what_is_free_at_once() -> None:
    slots = Slots(4)
    assert await slots.take(3) == 3  # held by running handlers
    consumer = _consumer(slots, linger_s=10)
    assert await asyncio.wait_for(consumer._take(4, full=0), 1) == 1


async def test_after_a_full_read_it_gathers_the_slots_handlers_free() -> None:
    slots = Slots(4)
    assert await slots.take(3) == 3
    taking = asyncio.create_task(_consumer(slots, linger_s=10)._take(4, full=4))
    for _ in range(3):
        await asyncio.sleep(0.01)
        assert not taking.done()
        slots.give()
    assert await asyncio.wait_for(taking, 1) == 4  # every slot, long before the linger


async def test_it_gathers_no_more_than_the_last_read_carried() -> None:
    """Two slots cycle, six are held by long handlers: a read of two is followed by the next
    as soon as two are back, not after waiting out the linger for the six."""
    slots = Slots(8)
    assert await slots.take(8) == 8
    taking = asyncio.create_task(_consumer(slots, linger_s=10)._take(8, full=2))
    await asyncio.sleep(0.01)
    slots.give()
    await asyncio.sleep(0.01)
    assert not taking.done()
    slots.give()
    assert await asyncio.wait_for(taking, 1) == 2


async def test_a_type_under_flow_limits_does_not_gather() -> None:
    slots = Slots(4)
    assert await slots.take(3) == 3
    consumer = _consumer(slots, linger_s=10, limited=True)
    assert await asyncio.wait_for(consumer._take(4, full=4), 1) == 1
    unlimited = _consumer(slots, linger_s=10, limited=False)
    slots.give()
    taking = asyncio.create_task(unlimited._take(4, full=4))
    await asyncio.sleep(0.01)
    assert not taking.done()  # the same call without the limit gathers
    taking.cancel()
    with pytest.raises(asyncio.CancelledError):
        await taking


async def test_shutdown_during_a_gather_means_no_read() -> None:
    slots = Slots(4)
    assert await slots.take(3) == 3
    taking = asyncio.create_task(_consumer(slots, linger_s=10)._take(4, full=4))
    await asyncio.sleep(0.01)
    slots.give()
    await asyncio.sleep(0.01)
    slots.close()
    assert await asyncio.wait_for(taking, 1) == 0
    assert slots.free == 2  # the two it held are back; the handlers' two are still out


async def test_cancelled_while_gathering_it_gives_its_slots_back() -> None:
    slots = Slots(4)
    assert await slots.take(3) == 3
    taking = asyncio.create_task(_consumer(slots, linger_s=10)._take(4, full=4))
    await asyncio.sleep(0.01)
    slots.give()
    await asyncio.sleep(0.01)
    taking.cancel()
    with pytest.raises(asyncio.CancelledError):
        await taking
    assert slots.free == 2
