"""A consumer's slots for its next read: at once after a short read (an idle stream never
waits for the linger), gathered after a full one (but not the slots of handlers that have run
for long already), none once shutdown closed the slots while it gathered
(no new read), none lost when it is cancelled meanwhile, and no gathering under flow limits."""

from __future__ import annotations

import asyncio
import uuid
from types import SimpleNamespace
from typing import Any, cast

import pytest

from conveyor.queue.streams import Message
from conveyor.worker.consumer import LONG_RUNS, Consumer
from conveyor.worker.inflight import InFlight
from conveyor.worker.slots import Slots
from tests.apps import fair


def _consumer(slots: Slots, linger_s: float, *, limited: bool | None = None,
              in_flight: InFlight | None = None) -> Consumer:
    gate = None if limited is None else SimpleNamespace(
        of=lambda _name: SimpleNamespace(limited=limited))
    dispatcher = SimpleNamespace(in_flight=in_flight or InFlight())
    return Consumer(fair.app.registry.types["busy"], worker_id="w1", streams=cast(Any, None),
                    slots=slots, dispatcher=cast(Any, dispatcher), spawn=lambda _: None,
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


async def test_it_does_not_wait_for_the_slots_of_long_running_handlers() -> None:
    """Two slots cycle, six are held by handlers that have run for many lingers: once the two
    are back it reads with them rather than wait out the linger for the six."""
    slots = Slots(8)
    assert await slots.take(8) == 8
    in_flight = InFlight()
    in_flight.hold("busy", "c", [Message(f"{i}-0".encode(), uuid.uuid4(), 0) for i in range(8)])
    for held in list(in_flight)[:6]:
        held.since -= 2 * 10 * LONG_RUNS  # held for twice LONG_RUNS lingers of 10 s
    taking = asyncio.create_task(
        _consumer(slots, linger_s=10, in_flight=in_flight)._take(8, full=2))
    await asyncio.sleep(0.01)
    slots.give()
    await asyncio.sleep(0.01)
    assert not taking.done()
    slots.give()
    assert await asyncio.wait_for(taking, 1) == 2  # at once, not after 10 s


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


async def _gathering_with_one_back(slots: Slots) -> asyncio.Task[int]:
    """A consumer after a full read of 4, three slots out, one given back to its gathering."""
    assert await slots.take(3) == 3
    taking = asyncio.create_task(_consumer(slots, linger_s=10)._take(4, full=4))
    await asyncio.sleep(0.01)
    slots.give()
    await asyncio.sleep(0.01)
    assert not taking.done()
    return taking


async def test_shutdown_during_a_gather_means_no_read() -> None:
    slots = Slots(4)
    taking = await _gathering_with_one_back(slots)
    slots.close()
    assert await asyncio.wait_for(taking, 1) == 0
    assert slots.free == 2  # the two it held are back; the handlers' two are still out


async def test_cancelled_while_gathering_it_gives_its_slots_back() -> None:
    slots = Slots(4)
    taking = await _gathering_with_one_back(slots)
    taking.cancel()
    with pytest.raises(asyncio.CancelledError):
        await taking
    assert slots.free == 2
