"""Starter batches: each started task goes to exactly one of the requests that asked for it."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

from conveyor.store.tasks import NotStarted, Started
from conveyor.worker.starter import Starter, _Request


async def handed(request: _Request) -> tuple[list[Started], list[NotStarted]]:
    result = await asyncio.wait_for(request.done, 1)
    assert result is not None
    return result


def started(task_id: uuid.UUID) -> Started:
    return Started(task_id, "echo", {}, 1, 3, datetime.now(UTC))


async def test_copies_of_one_task_in_two_requests_start_it_once() -> None:
    a, b, c = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    first, second = _Request([a, b]), _Request([b, c])
    gone = NotStarted(c, "cancelled", None, False)
    Starter._hand_out([first, second], ([started(a), started(b)], [gone]))
    first_started, first_not = await handed(first)
    second_started, second_not = await handed(second)
    assert [s.id for s in first_started] == [a, b]
    assert first_not == []
    assert second_started == []
    assert [(n.id, n.status) for n in second_not] == [(b, "running"), (c, "cancelled")]


async def test_a_cancelled_request_is_skipped() -> None:
    a = uuid.uuid4()
    gone, live = _Request([a]), _Request([a])
    gone.done.cancel()
    Starter._hand_out([gone, live], ([started(a)], []))
    live_started, live_not = await handed(live)
    assert [s.id for s in live_started] == [a]
    assert live_not == []
