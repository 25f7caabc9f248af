"""The recorder's recovery after a write whose reply was lost: what it finds recorded by this
worker is not mistaken for an attempt another worker took over; its batches linger for more
outcomes only while handlers run; a stale outcome in a batch does not hide the current one."""

from __future__ import annotations

import asyncio

from conveyor.runtime.shutdown import Shutdown
from conveyor.state import AppState
from conveyor.store.pool import Pinned
from conveyor.store.tasks import Outcome
from conveyor.worker.recorder import Recorder


async def test_a_retry_that_ended_a_cancelled_task_is_found_recorded(state: AppState) -> None:
    """An outcome that would retry a task whose cancel was requested is stored `cancelled`;
    if the reply of that write was lost, the check that follows finds it (not superseded)."""
    task = (await state.client.enqueue("echo", {"text": "x"})).record
    started, _ = await state.store.mark_running([task.id], "w1")
    assert started
    assert (await state.store.request_cancel(task.id)) is not None
    outcome = Outcome(task.id, "echo", started[0].attempt, "queued", error="boom", delay_s=1)
    recorded = await state.store.record([outcome], "w1")  # committed; its reply "lost"
    assert [r.status for r in recorded] == ["cancelled"]
    pinned = Pinned(state.pool)
    try:
        recorder = Recorder(state.store, state.streams, pinned, "w1", on_settled=lambda _: None)
        found = await recorder._already_recorded([outcome])
    finally:
        await pinned.release()
    assert found[task.id].status == "cancelled"


async def _record(state: AppState, outcomes: list[Outcome], *, busy: bool) -> list[int]:
    """`outcomes` handed over 30 ms apart to a recorder lingering 0.5 s: the sizes of the
    statements that recorded them."""
    sizes: list[int] = []
    record = state.store.record

    async def counted(outcomes: list[Outcome], worker: str, **kw: object) -> object:
        sizes.append(len(outcomes))
        return await record(outcomes, worker, **kw)  # type: ignore[arg-type]

    state.store.record = counted  # type: ignore[assignment, method-assign]
    pinned = Pinned(state.pool)
    settled: list[object] = []
    recorder = Recorder(state.store, state.streams, pinned, "w1", on_settled=settled.extend,
                        linger_s=0.5, busy=lambda: busy)
    shutdown, until = Shutdown(), Shutdown()
    running = asyncio.create_task(recorder.run(shutdown, until))
    try:
        for i, outcome in enumerate(outcomes):
            await recorder.submit(f"{i + 1}-0".encode(), outcome)
            await asyncio.sleep(0.03)
        until.begin()
        await asyncio.wait_for(running, 5)
    finally:
        del state.store.record
        await pinned.release()
    assert len(settled) == len(outcomes)  # every message settled, the stale one's too
    return sizes


async def _record_two(state: AppState, *, busy: bool) -> list[int]:
    tasks = [(await state.client.enqueue("echo", {"text": str(i)})).record for i in range(2)]
    started, _ = await state.store.mark_running([t.id for t in tasks], "w1")
    sizes = await _record(
        state, [Outcome(t.id, "echo", t.attempt, "succeeded", "null") for t in started], busy=busy
    )
    assert {(await state.store.get(t.id)).status for t in tasks} == {"succeeded"}  # type: ignore[union-attr]
    return sizes


async def test_outcomes_arriving_while_handlers_run_share_one_statement(state: AppState) -> None:
    assert await _record_two(state, busy=True) == [2]


async def test_an_idle_worker_records_at_once(state: AppState) -> None:
    assert await _record_two(state, busy=False) == [1, 1]


async def test_a_stale_outcome_in_a_batch_does_not_hide_the_current_one(state: AppState) -> None:
    """An attempt-3 outcome left over from before a retry (which counts attempts from 0 again)
    reaches the recorder in the same batch as the current attempt 1's: the current one is
    recorded, the stale one is not, and both messages are settled."""
    task = (await state.client.enqueue("echo", {"text": "x"})).record
    [started], _ = await state.store.mark_running([task.id], "w1")
    assert started.attempt == 1
    sizes = await _record(state, [
        Outcome(task.id, "echo", 3, "succeeded", '"stale"'),
        Outcome(task.id, "echo", 1, "succeeded", '"current"'),
    ], busy=True)
    row = await state.store.get(task.id)
    assert row is not None
    assert (row.status, row.result) == ("succeeded", "current")
    assert sizes == [1, 1]  # one outcome of the task per statement
