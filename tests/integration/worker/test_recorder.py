"""The recorder's recovery after a write whose reply was lost: what it finds recorded by this
worker is not mistaken for an attempt another worker took over."""

from __future__ import annotations

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
