"""A worker whose thread or process handler hangs past its timeout: the attempt fails, and
the retry (and every later task) runs at once instead of queueing behind the hung call."""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
from pydantic import BaseModel
from structlog.testing import capture_logs

from conveyor.application import Conveyor
from conveyor.config import Settings
from conveyor.registry import RetryPolicy, TaskContext
from conveyor.state import AppState
from conveyor.store.tasks import TaskRecord
from conveyor.testing.servers import PostgresServer, RedisServer
from conveyor.worker.worker import Worker
from tests.conftest import eventually, make_settings

pytestmark = pytest.mark.slow

StartWorker = Callable[..., Awaitable[Worker]]

hang_app = Conveyor()
released = threading.Event()  # set at teardown, so a hung thread ends


class Nothing(BaseModel):
    pass


@hang_app.task("hang_thread", payload=Nothing, timeout=0.5, max_attempts=2,
               retry=RetryPolicy(base_delay_s=0.05, max_delay_s=0.1))
def hang_thread(payload: Nothing, ctx: TaskContext) -> dict[str, int]:
    if ctx.attempt == 1:
        released.wait(60)
    return {"attempt": ctx.attempt}


@hang_app.task("hang_process", payload=Nothing, timeout=1.0, max_attempts=2, process=True,
               retry=RetryPolicy(base_delay_s=0.05, max_delay_s=0.1))
def hang_process(payload: Nothing, ctx: TaskContext) -> dict[str, int]:
    if ctx.attempt == 1:
        time.sleep(60)
    return {"attempt": ctx.attempt, "pid": os.getpid()}


@pytest.fixture
def settings(postgres: PostgresServer, redis_server: RedisServer) -> Settings:
    # One thread, one process: without the fix the retry would wait behind the hung call.
    return make_settings(postgres, redis_server.url, concurrency=1, process_pool_size=1)


@pytest.fixture
def app() -> Iterator[Conveyor]:
    released.clear()
    yield hang_app
    released.set()


async def finished(state: AppState, task_id: uuid.UUID) -> TaskRecord:
    record: TaskRecord | None = None

    async def done() -> bool:
        nonlocal record
        record = await state.store.get(task_id)
        return record is not None and record.status in ("succeeded", "dead")

    await eventually(done, timeout_s=30)
    assert record is not None
    return record


@pytest.mark.parametrize(("task_type", "timeout"), [("hang_thread", 0.5),
                                                    ("hang_process", 1.0)])
async def test_a_hung_handler_times_out_and_the_retry_runs_at_once(
    state: AppState, start_worker: StartWorker, task_type: str, timeout: float
) -> None:
    hung = (await state.client.enqueue(task_type, {})).record.id
    with capture_logs() as logs:
        await start_worker(types=[task_type])
        record = await finished(state, hung)
    assert record.status == "succeeded", record.last_error
    assert record.attempts == 2
    failures = [e for e in logs if e["event"] == "task.failed"]
    assert [e["error"] for e in failures] == [f"timed out after {timeout} s"]
    result: Any = record.result
    assert result["attempt"] == 2
