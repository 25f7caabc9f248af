"""The worker's event publisher lingers for more events while handlers run, but never with a
final event waiting: waiters end on those."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence

from conveyor.queue.events import Event, Publisher, event
from conveyor.runtime.shutdown import Shutdown
from conveyor.state import AppState


async def test_a_final_event_cuts_the_linger_short_and_keeps_the_order(state: AppState) -> None:
    batches: list[list[str]] = []
    published = asyncio.Event()
    publish = state.events.publish

    async def counted(events: Sequence[Event]) -> None:
        batches.append([e.kind for e in events])
        await publish(events)
        published.set()

    state.events.publish = counted  # type: ignore[method-assign]
    # A linger far longer than the test's bound: only a publish that skips it ends in time.
    publisher = Publisher(state.events, linger_s=600.0, busy=lambda: True)
    stop = Shutdown()
    running = asyncio.create_task(publisher.run(stop))
    task_id = str(uuid.uuid4())
    try:
        publisher.emit(event("started", task_id, "echo", "running", attempt=1))
        await asyncio.sleep(0.05)  # the publisher is lingering on the start now
        publisher.emit(event("succeeded", task_id, "echo", "succeeded", attempt=1))
        await asyncio.wait_for(published.wait(), 10)
        assert batches == [["started", "succeeded"]]
        kinds = [e.kind for e in (await state.events.since("0-0"))[0]
                 if e.task_id == task_id]
        assert kinds == ["started", "succeeded"]
    finally:
        stop.begin()
        await asyncio.wait_for(running, 10)
        del state.events.publish
