"""Which started tasks the dispatcher does not run again because a handler of the very same
attempt already runs here (a start a Postgres crash forgot, made again by the relay's copy):
pure bookkeeping over the in-flight table, no delivery."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from types import SimpleNamespace

from conveyor.queue.streams import Message
from conveyor.registry import Lease
from conveyor.store.tasks import Started
from conveyor.worker.dispatcher import Dispatcher
from conveyor.worker.inflight import InFlight


def _started(task_id: uuid.UUID, attempt: int) -> Started:
    return Started(task_id, "sleep", {}, attempt, 3, datetime.now(UTC))


async def _case(*, attempt: int, lost: bool = False, submitted: bool = False
                ) -> tuple[list[Started], list[Message]]:
    """A handler of task T runs here at attempt 1; a copy of T was just read and started at
    `attempt`. Returns what is left to run and the copies to ack."""
    in_flight = InFlight()
    task_id = uuid.uuid4()
    first, copy = Message(b"1-0", task_id), Message(b"2-0", task_id)
    in_flight.hold("sleep", "c", [first])
    lease = Lease()
    lease.lost = lost
    handler = asyncio.get_running_loop().create_future()
    in_flight.running("sleep", first.stream_id, 1, handler, lease, run_in="loop")
    if submitted:
        in_flight.submitted(("sleep", first.stream_id))
    in_flight.hold("sleep", "c", [copy])
    dispatcher = SimpleNamespace(in_flight=in_flight, task_type=SimpleNamespace(name="sleep"))
    duplicates: list[Message] = []
    left = Dispatcher._restarted(dispatcher, [_started(task_id, attempt)],  # type: ignore[arg-type]
                                 {task_id: copy}, duplicates)
    handler.cancel()
    return left, duplicates


async def test_a_start_made_again_at_the_running_attempt_is_not_run_twice() -> None:
    left, duplicates = await _case(attempt=1)
    assert left == []
    assert [m.stream_id for m in duplicates] == [b"2-0"]


async def test_a_new_attempt_runs_beside_a_handler_of_an_older_one() -> None:
    left, duplicates = await _case(attempt=2)  # re-queued from a worker that looked dead
    assert len(left) == 1
    assert duplicates == []


async def test_a_handler_whose_lease_is_lost_does_not_count() -> None:
    left, duplicates = await _case(attempt=1, lost=True)  # its outcome would be discarded
    assert len(left) == 1
    assert duplicates == []


async def test_a_handler_that_handed_over_its_outcome_does_not_count() -> None:
    left, duplicates = await _case(attempt=1, submitted=True)
    assert len(left) == 1
    assert duplicates == []


def test_the_count_of_messages_held_per_task_follows_hold_and_release() -> None:
    in_flight = InFlight()
    task_id = uuid.uuid4()
    a, b = Message(b"1-0", task_id), Message(b"2-0", task_id)
    in_flight.hold("t", "c", [a, b])
    in_flight.hold("t", "c", [a])  # the very entry again: not counted twice
    assert in_flight.holding(task_id) == 2
    in_flight.release([("t", b"1-0"), ("t", b"1-0"), ("t", b"9-9")])
    assert in_flight.holding(task_id) == 1
    in_flight.release([("t", b"2-0")])
    assert in_flight.holding(task_id) == 0
