"""`Executor.execute`: one handler call turned into an Outcome."""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from pydantic import BaseModel

from conveyor.config import Settings
from conveyor.errors import Fail, Retry
from conveyor.registry import Handler, RetryPolicy, RunIn, TaskContext, TaskType
from conveyor.store.tasks import Started
from conveyor.worker.executor import Executor


class Numbers(BaseModel):
    a: int
    b: int = 0


class Sum(BaseModel):
    total: int


# Module level, so a spawned process-pool child can import them by name.
def process_add(payload: Numbers, ctx: TaskContext) -> dict[str, int]:
    return {"total": payload.a + payload.b, "pid": os.getpid(), "attempt": ctx.attempt}


def process_retry(payload: Numbers, ctx: TaskContext) -> None:
    raise Retry("come back later", delay_s=7.5)


def make_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": "postgresql://x",
        "redis_url": "redis://x",
        "retry_base_delay": 1.0,
        "retry_max_delay": 60.0,
        "process_pool_size": 1,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def executor() -> Iterator[Executor]:
    ex = Executor(make_settings(), "worker-1")
    yield ex
    ex.close()


def make_type(
    handler: Handler,
    run_in: RunIn = "loop",
    *,
    timeout_s: float | None = None,
    retry: RetryPolicy | None = None,
) -> TaskType:
    return TaskType(
        name="add", payload_model=Numbers, handler=handler, run_in=run_in,
        timeout_s=timeout_s, retry=retry,
    )


def started(attempt: int = 1, max_attempts: int = 3, payload: Any = None) -> Started:
    return Started(
        id=uuid.uuid4(),
        type="add",
        payload={"a": 2, "b": 3} if payload is None else payload,
        attempt=attempt,
        max_attempts=max_attempts,
        run_at=datetime(2024, 1, 1, tzinfo=UTC),
    )


# -- success -----------------------------------------------------------------------------------


async def test_success_returns_succeeded_with_result_json(executor: Executor) -> None:
    seen: list[TaskContext] = []

    async def add(payload: Numbers, ctx: TaskContext) -> dict[str, int]:
        seen.append(ctx)
        return {"total": payload.a + payload.b}

    task = started(attempt=2)
    outcome = await executor.execute(make_type(add), task)
    assert outcome.status == "succeeded"
    assert outcome.task_id == task.id
    assert outcome.task_type == "add"
    assert outcome.attempt == 2
    assert outcome.error is None
    assert outcome.result_json is not None
    assert orjson.loads(outcome.result_json) == {"total": 5}
    (ctx,) = seen
    assert ctx.task_id == str(task.id)
    assert ctx.task_type == "add"
    assert ctx.attempt == 2
    assert ctx.max_attempts == 3
    assert ctx.run_at == task.run_at
    assert ctx.worker_id == "worker-1"
    assert ctx.settings is executor.settings


async def test_model_and_none_results_are_serialised(executor: Executor) -> None:
    async def as_model(payload: Numbers, ctx: TaskContext) -> Sum:
        return Sum(total=payload.a)

    async def as_none(payload: Numbers, ctx: TaskContext) -> None:
        return None

    outcome = await executor.execute(make_type(as_model), started())
    assert outcome.result_json == '{"total":2}'
    outcome = await executor.execute(make_type(as_none), started())
    assert outcome.status == "succeeded"
    assert outcome.result_json == "null"


# -- Retry / Fail / exceptions -----------------------------------------------------------------


async def test_retry_with_delay_uses_that_delay(executor: Executor) -> None:
    async def handler(payload: Numbers, ctx: TaskContext) -> None:
        raise Retry("rate limited", delay_s=12.5)

    outcome = await executor.execute(make_type(handler), started(attempt=1))
    assert outcome.status == "queued"
    assert outcome.delay_s == 12.5
    assert outcome.error == "retry requested: rate limited"
    assert outcome.result_json is None


async def test_retry_with_negative_delay_is_clamped(executor: Executor) -> None:
    async def handler(payload: Numbers, ctx: TaskContext) -> None:
        raise Retry("now", delay_s=-5)

    outcome = await executor.execute(make_type(handler), started())
    assert outcome.status == "queued"
    assert outcome.delay_s == 0.0


async def test_retry_without_delay_uses_the_default_policy(executor: Executor) -> None:
    async def handler(payload: Numbers, ctx: TaskContext) -> None:
        raise Retry()

    # settings: base 1.0 s, jitter 0.5 -> attempt 2 waits between 1.0 and 2.0 s
    outcome = await executor.execute(make_type(handler), started(attempt=2))
    assert outcome.status == "queued"
    assert 1.0 <= outcome.delay_s <= 2.0
    assert outcome.error == "retry requested: retry requested"


async def test_retry_without_delay_uses_the_type_policy(executor: Executor) -> None:
    async def handler(payload: Numbers, ctx: TaskContext) -> None:
        raise Retry("again")

    policy = RetryPolicy(base_delay_s=10.0, max_delay_s=15.0, jitter=0.0)
    first = await executor.execute(make_type(handler, retry=policy), started(attempt=1))
    second = await executor.execute(make_type(handler, retry=policy), started(attempt=2))
    assert (first.delay_s, second.delay_s) == (10.0, 15.0)


async def test_retry_on_last_attempt_is_dead(executor: Executor) -> None:
    async def handler(payload: Numbers, ctx: TaskContext) -> None:
        raise Retry("still busy", delay_s=1.0)

    outcome = await executor.execute(make_type(handler), started(attempt=3, max_attempts=3))
    assert outcome.status == "dead"
    assert outcome.error is not None
    assert "retry requested: still busy" in outcome.error
    assert "gave up after 3 attempts" in outcome.error


async def test_fail_is_dead_at_once(executor: Executor) -> None:
    calls = 0

    async def handler(payload: Numbers, ctx: TaskContext) -> None:
        nonlocal calls
        calls += 1
        raise Fail("bad input")

    outcome = await executor.execute(make_type(handler), started(attempt=1, max_attempts=5))
    assert calls == 1
    assert outcome.status == "dead"
    assert outcome.error == "failed: bad input"
    assert outcome.task_type == "add"


async def test_generic_exception_is_retried_until_the_last_attempt(executor: Executor) -> None:
    async def handler(payload: Numbers, ctx: TaskContext) -> None:
        raise ValueError("boom")

    task_type = make_type(handler, retry=RetryPolicy(base_delay_s=1.0, jitter=0.0))
    outcomes = [
        await executor.execute(task_type, started(attempt=n, max_attempts=3)) for n in (1, 2, 3)
    ]
    assert [o.status for o in outcomes] == ["queued", "queued", "dead"]
    assert [o.attempt for o in outcomes] == [1, 2, 3]
    assert [o.delay_s for o in outcomes[:2]] == [1.0, 2.0]
    for outcome in outcomes:
        assert outcome.error is not None
        assert "ValueError: boom" in outcome.error
        assert "Traceback" in outcome.error
    assert outcomes[2].error is not None
    assert "gave up after 3 attempts" in outcomes[2].error


async def test_long_errors_are_bounded(executor: Executor) -> None:
    async def handler(payload: Numbers, ctx: TaskContext) -> None:
        raise RuntimeError("x" * 20_000)

    outcome = await executor.execute(make_type(handler), started())
    assert outcome.error is not None
    assert len(outcome.error) <= 4000
    outcome = await executor.execute(make_type(handler), started(attempt=3, max_attempts=3))
    assert outcome.error is not None
    assert len(outcome.error) <= 4000
    assert outcome.error.endswith("(gave up after 3 attempts)")


async def test_timeout_is_retried(executor: Executor) -> None:
    cancelled = asyncio.Event()

    async def slow(payload: Numbers, ctx: TaskContext) -> None:
        try:
            await asyncio.sleep(1)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    loop = asyncio.get_running_loop()
    began = loop.time()
    outcome = await executor.execute(make_type(slow, timeout_s=0.05), started(attempt=1))
    assert loop.time() - began < 0.5
    assert cancelled.is_set()
    assert outcome.status == "queued"
    assert outcome.error == "timed out after 0.05 s"


async def test_timeout_on_last_attempt_is_dead(executor: Executor) -> None:
    async def slow(payload: Numbers, ctx: TaskContext) -> None:
        await asyncio.sleep(1)

    outcome = await executor.execute(make_type(slow, timeout_s=0.05), started(attempt=2,
                                                                               max_attempts=2))
    assert outcome.status == "dead"
    assert outcome.error is not None
    assert outcome.error.startswith("timed out after 0.05 s")


async def test_timeout_error_raised_by_the_handler_is_not_reported_as_a_timeout(
    executor: Executor,
) -> None:
    async def handler(payload: Numbers, ctx: TaskContext) -> None:
        raise TimeoutError("upstream took too long")

    outcome = await executor.execute(make_type(handler, timeout_s=5.0), started())
    assert outcome.status == "queued"
    assert outcome.error is not None
    assert "TimeoutError: upstream took too long" in outcome.error
    assert "timed out after" not in outcome.error


# -- where handlers run ------------------------------------------------------------------------


async def test_sync_handler_runs_in_a_thread(executor: Executor) -> None:
    threads: list[threading.Thread] = []

    def add(payload: Numbers, ctx: TaskContext) -> int:
        threads.append(threading.current_thread())
        return payload.a + payload.b

    outcome = await executor.execute(make_type(add, "thread"), started())
    assert outcome.status == "succeeded"
    assert outcome.result_json == "5"
    (thread,) = threads
    assert thread is not threading.current_thread()
    assert thread.name.startswith("conveyor-task")


async def test_sync_handler_exceptions_are_handled_like_async_ones(executor: Executor) -> None:
    def retry(payload: Numbers, ctx: TaskContext) -> None:
        raise Retry("later", delay_s=3.0)

    def fail(payload: Numbers, ctx: TaskContext) -> None:
        raise Fail("no")

    outcome = await executor.execute(make_type(retry, "thread"), started())
    assert (outcome.status, outcome.delay_s) == ("queued", 3.0)
    outcome = await executor.execute(make_type(fail, "thread"), started())
    assert (outcome.status, outcome.error) == ("dead", "failed: no")


@pytest.mark.slow
async def test_process_handler_runs_in_another_process_and_retry_survives_pickling() -> None:
    executor = Executor(make_settings(process_pool_size=1), "worker-p")
    try:
        outcome = await executor.execute(make_type(process_add, "process"), started(attempt=2))
        assert outcome.status == "succeeded", outcome.error
        assert outcome.result_json is not None
        result = orjson.loads(outcome.result_json)
        assert result["total"] == 5
        assert result["attempt"] == 2
        assert result["pid"] != os.getpid()

        outcome = await executor.execute(make_type(process_retry, "process"), started(attempt=1))
        assert outcome.status == "queued", outcome.error
        assert outcome.delay_s == 7.5
        assert outcome.error == "retry requested: come back later"
    finally:
        executor.close()


# -- payloads and results ----------------------------------------------------------------------


@pytest.mark.parametrize("payload", [{"b": 1}, {"a": "not a number"}, [1, 2], "x"])
async def test_invalid_payload_is_dead_without_calling_the_handler(
    executor: Executor, payload: Any
) -> None:
    calls = 0

    async def handler(payload: Numbers, ctx: TaskContext) -> None:
        nonlocal calls
        calls += 1

    outcome = await executor.execute(make_type(handler), started(attempt=1, payload=payload))
    assert calls == 0
    assert outcome.status == "dead"
    assert outcome.error is not None
    assert outcome.error.startswith("payload no longer matches add")


@pytest.mark.parametrize("result", [object(), {1, 2}, {"nested": [b"bytes"]}])
async def test_non_json_result_is_dead(executor: Executor, result: Any) -> None:
    async def handler(payload: Numbers, ctx: TaskContext) -> Any:
        return result

    outcome = await executor.execute(make_type(handler), started(attempt=1, max_attempts=3))
    assert outcome.status == "dead"
    assert outcome.result_json is None
    assert outcome.error is not None
    assert outcome.error.startswith("result is not JSON-serialisable")
