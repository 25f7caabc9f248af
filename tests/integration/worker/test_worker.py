"""The worker on real Postgres and Redis: concurrency, retries, dead letters, drain."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from conveyor.cron.rebalance import Rebalancer
from conveyor.queue.keys import GROUP
from conveyor.runtime.shutdown import Shutdown
from conveyor.state import AppState
from conveyor.store.tasks import TaskRecord
from conveyor.worker import dispatcher as dispatcher_module
from conveyor.worker.worker import Worker
from tests.apps import basic
from tests.conftest import eventually, judge

StartWorker = Callable[..., Awaitable[Worker]]


async def enqueue(state: AppState, type_: str, payload: dict[str, Any], **kw: Any) -> str:
    inserted = await state.client.enqueue(type_, payload, **kw)
    return str(inserted.record.id)


async def wait_for(state: AppState, task_id: str, *statuses: str,
                   timeout_s: float = 15.0) -> TaskRecord:
    record: TaskRecord | None = None

    async def reached() -> bool:
        nonlocal record
        record = await state.store.get(uuid.UUID(task_id))
        return record is not None and record.status in statuses

    await eventually(reached, timeout_s)
    assert record is not None
    return record


async def pending(state: AppState, task_type: str) -> int:
    summary: Any = await state.redis.xpending(state.keys.stream(task_type), GROUP)
    return int(summary["pending"])


async def test_never_more_handlers_than_concurrency(state: AppState, start_worker: StartWorker
                                                    ) -> None:
    ids = [await enqueue(state, "sleep", {"seconds": 0.5}) for _ in range(20)]
    await start_worker(types=["sleep", "echo"])
    for task_id in ids:
        await wait_for(state, task_id, "succeeded")
    assert basic.probe.peak == state.settings.concurrency == 5
    assert await pending(state, "sleep") == 0


async def test_failure_is_retried_with_backoff_until_it_succeeds(
    state: AppState, start_worker: StartWorker
) -> None:
    task_id = await enqueue(state, "flaky", {"failures": 2})
    await start_worker()
    record = await wait_for(state, task_id, "succeeded")
    assert record.attempts == 3
    assert record.result == {"attempts": 3}
    assert record.last_error is None  # an earlier attempt's error does not outlive the success
    assert basic.probe.runs[task_id] == 3


async def test_an_unexpected_exception_is_a_warning_with_its_traceback(
    state: AppState, start_worker: StartWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A logger cached by an earlier `logs.configure()` would bypass capture_logs.
    monkeypatch.setattr(dispatcher_module, "log", structlog.get_logger("conveyor.dispatcher"))
    with capture_logs() as logs:
        crash = await enqueue(state, "flaky", {"failures": 1})
        refused = await enqueue(state, "refuse", {})
        await start_worker()
        await wait_for(state, crash, "succeeded")
        await wait_for(state, refused, "dead")
    failed = {e["task_id"]: e for e in logs if e["event"] == "task.failed"}
    assert failed[crash]["log_level"] == "warning"
    assert "Traceback" in failed[crash]["error"]
    assert "RuntimeError: planned failure 1" in failed[crash]["error"]
    assert failed[refused]["log_level"] == "info"  # Fail (and Retry) are the handler's choice


async def test_always_failing_task_goes_dead_then_retry_brings_it_back(
    state: AppState, start_worker: StartWorker
) -> None:
    task_id = await enqueue(state, "doomed", {})
    await start_worker()
    record = await wait_for(state, task_id, "dead")
    assert record.attempts == 3 == record.max_attempts
    assert "always fails" in (record.last_error or "")
    assert "gave up after 3 attempts" in (record.last_error or "")

    async def dead_lettered() -> bool:  # Postgres first, then the settle in Redis
        letters: Any = await state.redis.xrange(state.keys.dead("doomed"))
        return [fields[b"id"].decode() for _, fields in letters] == [task_id]

    await eventually(dead_lettered)
    assert basic.probe.runs[task_id] == 3

    again = await state.client.retry(uuid.UUID(task_id))
    assert (again.status, again.attempts) == ("queued", 0)
    await eventually(lambda: _runs_at_least(task_id, 6))
    record = await wait_for(state, task_id, "dead")
    assert record.attempts == 3


async def _runs_at_least(task_id: str, n: int) -> bool:
    return basic.probe.runs[task_id] >= n


async def test_fail_is_dead_at_once(state: AppState, start_worker: StartWorker) -> None:
    task_id = await enqueue(state, "refuse", {})
    await start_worker()
    record = await wait_for(state, task_id, "dead")
    assert record.attempts == 1
    assert "not doing this" in (record.last_error or "")


async def test_timeout_is_an_attempt_that_failed(state: AppState, start_worker: StartWorker
                                                 ) -> None:
    task_id = await enqueue(state, "timeout", {"seconds": 5})
    await start_worker()
    record = await wait_for(state, task_id, "dead")
    assert record.attempts == 2
    assert "timed out after 0.2 s" in (record.last_error or "")


async def test_blocking_handlers_run_off_the_loop(state: AppState, start_worker: StartWorker
                                                  ) -> None:
    ids = [await enqueue(state, "blocking", {"seconds": 0.5}) for _ in range(4)]
    await start_worker()
    began = time.monotonic()
    lag = 0.0
    while time.monotonic() - began < 0.4:  # the loop keeps ticking while threads sleep
        tick = time.monotonic()
        await asyncio.sleep(0.01)
        lag = max(lag, time.monotonic() - tick)
    for task_id in ids:
        await wait_for(state, task_id, "succeeded")
    assert lag < 0.2
    assert time.monotonic() - began < 1.9  # four 0.5 s sleeps overlapped


async def test_undecodable_and_unknown_messages_are_dead_lettered_not_retried(
    state: AppState, start_worker: StartWorker
) -> None:
    stream = state.keys.stream("echo")
    await state.redis.xadd(stream, {"garbage": "1"})
    await state.redis.xadd(stream, {"id": "not-a-uuid"})
    ghost = uuid.uuid4()
    await state.redis.xadd(stream, {"id": str(ghost)})
    control = await enqueue(state, "echo", {})
    await start_worker()
    await wait_for(state, control, "succeeded")

    async def three_letters() -> bool:
        return int(await state.redis.xlen(state.keys.dead("echo"))) == 3

    await eventually(three_letters)
    letters: Any = await state.redis.xrange(state.keys.dead("echo"))
    reasons = [fields[b"reason"].decode() for _, fields in letters]
    assert "no id field" in reasons[0]
    assert "not a UUID" in reasons[1]
    assert reasons[2] == "no such task in Postgres"
    assert letters[2][1][b"id"].decode() == str(ghost)
    await eventually(lambda: _no_pending(state, "echo"))


async def _no_pending(state: AppState, task_type: str) -> bool:
    return await pending(state, task_type) == 0


async def test_a_duplicate_message_runs_the_task_once(state: AppState, start_worker: StartWorker
                                                      ) -> None:
    task_id = await enqueue(state, "echo", {})
    await state.redis.xadd(state.keys.stream("echo"), {"id": task_id, "r": "0"})
    await state.redis.xadd(state.keys.stream("echo"), {"id": task_id, "r": "0"})
    await start_worker()
    await wait_for(state, task_id, "succeeded")
    await eventually(lambda: _no_pending(state, "echo"))
    assert basic.probe.runs[task_id] == 1


async def test_drain_finishes_in_flight_work_and_acks_it(state: AppState) -> None:
    ids = [await enqueue(state, "sleep", {"seconds": 1.0}) for _ in range(5)]
    worker = Worker(state, types=["sleep"])
    shutdown = Shutdown(drain_timeout_s=10)
    running = asyncio.create_task(worker.run(shutdown))
    await eventually(lambda: _running(5))
    shutdown.begin("test")
    await asyncio.wait_for(running, 15)
    for task_id in ids:
        record = await state.store.get(uuid.UUID(task_id))
        assert record is not None
        assert record.status == "succeeded"
    assert await pending(state, "sleep") == 0
    assert await state.workers.live(60) == []  # its row is gone at once


async def _running(n: int) -> bool:
    return basic.probe.running >= n


async def test_drain_timeout_hands_work_back_to_a_live_worker_at_once(
    state: AppState, start_worker: StartWorker
) -> None:
    task_id = await enqueue(state, "sleep", {"seconds": 30})
    worker = Worker(state, types=["sleep"])
    shutdown = Shutdown(drain_timeout_s=0.3)
    running = asyncio.create_task(worker.run(shutdown))
    await eventually(lambda: _running(1))
    survivor = await start_worker(types=["sleep"])  # idle, blocked in its read
    shutdown.begin("test")
    await asyncio.wait_for(running, 10)
    stopped = time.monotonic()

    async def started_elsewhere() -> bool:
        record = await state.store.get(uuid.UUID(task_id))
        return (record is not None and record.status == "running"
                and record.worker == survivor.worker_id)

    await eventually(started_elsewhere, timeout_s=10, interval_s=0.01)
    waited_s = time.monotonic() - stopped
    print(f"handed back and started elsewhere {waited_s * 1000:.0f} ms after the stop "
          f"(read block {state.settings.read_block * 1000:.0f} ms)")
    # Long before the rebalancer could have (a whole TTL of idleness, then its tick).
    assert waited_s < state.settings.heartbeat_ttl
    record = await state.store.get(uuid.UUID(task_id))
    assert record is not None
    assert record.attempts == 1  # the interrupted attempt is not counted
    assert basic.probe.runs[task_id] == 2


async def test_a_long_task_on_a_live_worker_is_not_taken_away(
    state: AppState, start_worker: StartWorker
) -> None:
    # heartbeat 1 s, TTL 3 s, rebalance every 0.5 s; the task runs 5 s (> TTL).
    task_id = await enqueue(state, "sleep", {"seconds": 5})
    await start_worker(types=["sleep"])
    rebalancer = Rebalancer(
        state.redis, state.keys, state.streams, state.store, ["sleep"], liveness=judge(state),
        interval_s=0.5, ttl_s=state.settings.heartbeat_ttl, max_requeues=5,
    )
    shutdown = Shutdown()
    rebalancing = asyncio.create_task(rebalancer.run(shutdown))
    await start_worker(types=["sleep"])  # a second, idle worker that could steal it
    try:
        record = await wait_for(state, task_id, "succeeded", timeout_s=20)
    finally:
        shutdown.begin()
        await rebalancing
    assert basic.probe.runs[task_id] == 1
    assert record.attempts == 1
