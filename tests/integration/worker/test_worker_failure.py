"""A worker whose own task fails (not a handler) cancels its handlers, leaves their messages
pending and raises one error, instead of orphaning handlers that run on."""

from __future__ import annotations

import asyncio

import pytest

from conveyor.queue.keys import GROUP
from conveyor.runtime.shutdown import Shutdown
from conveyor.state import AppState
from conveyor.worker.worker import Worker, WorkerFailed
from tests.apps import basic
from tests.conftest import eventually


async def test_a_failed_component_cancels_handlers_and_raises_once(state: AppState) -> None:
    worker = Worker(state, types=["sleep"])

    async def broken_forwarder(shutdown: Shutdown) -> None:
        await eventually(lambda: _true(basic.probe.running == 2))
        raise RuntimeError("forwarder bug")

    worker.forwarder.run = broken_forwarder  # type: ignore[method-assign]
    stop = Shutdown(5)
    running = asyncio.create_task(worker.run(stop))
    ids = [(await state.client.enqueue("sleep", {"seconds": 30})).record.id for _ in range(2)]
    with pytest.raises(WorkerFailed, match="forwarder bug"):
        await asyncio.wait_for(running, 10)
    assert basic.probe.running == 0  # no handler left running
    assert not worker.handlers
    summary = await state.redis.xpending(state.keys.stream("sleep"), GROUP)
    assert summary["pending"] == 2  # not acked: the rebalancer hands them on
    for task_id in ids:
        record = await state.store.get(task_id)
        assert record is not None
        assert record.status == "running"


async def _true(value: bool) -> bool:
    return value
