"""A worker stalled past the heartbeat TTL (SIGSTOP), then resumed (SIGCONT): its task was handed
to another worker meanwhile; on its first beat back it learns the lease is lost, cancels the
handler, and the task is recorded once, by the worker that now owns it."""

from __future__ import annotations

import signal
import uuid

import pytest

from conveyor.client import Client
from conveyor.state import AppState
from tests.apps import system
from tests.conftest import eventually
from tests.system.conftest import Spawner

pytestmark = pytest.mark.slow
APP = ["--app", "tests.apps.system:app"]


async def runs(state: AppState, task_id: uuid.UUID) -> int:
    value = await state.redis.get(system.runs_key(state.keys.prefix, str(task_id)))
    return int(value or 0)


async def test_a_stalled_worker_learns_its_lease_is_lost(state: AppState, spawn: Spawner) -> None:
    client = Client(state.store, state.streams, system.app.registry)
    stalled = spawn("worker", *APP, "--types", "stall")
    # Still running when the worker resumes, whatever the take-over took.
    task_id = (await client.enqueue("stall", {"first_attempt_s": 60})).record.id

    async def began() -> bool:
        return await runs(state, task_id) == 1

    await eventually(began, timeout_s=30)
    first = await state.store.get(task_id)
    assert first is not None
    stalled.signal(signal.SIGSTOP)
    try:
        spawn("cron", *APP)
        spawn("worker", *APP, "--types", "stall")

        async def taken_over() -> bool:
            record = await state.store.get(task_id)
            return (record is not None and record.status == "running"
                    and record.worker != first.worker)

        await eventually(taken_over, timeout_s=30)
    finally:
        stalled.signal(signal.SIGCONT)

    async def lease_lost_reported() -> bool:
        return '"event":"task.lease.lost"' in stalled.output()

    await eventually(lease_lost_reported, timeout_s=10)

    async def succeeded() -> bool:
        record = await state.store.get(task_id)
        return record is not None and record.status == "succeeded"

    await eventually(succeeded, timeout_s=30)
    record = await state.store.get(task_id)
    assert record is not None
    assert record.worker != first.worker
    assert record.attempts == 2
    assert record.result == {"worker": record.worker}  # the new owner's run is the one kept
    assert await runs(state, task_id) == 2
    assert stalled.popen.poll() is None  # it carries on, it did not exit
    line = next(x for x in stalled.output().splitlines() if "task.lease.lost" in x)
    assert str(task_id) in line
    assert '"cancelled":true' in line
    assert "task.outcome.discarded" not in stalled.output()  # cancelled, never finished
