"""`Executor.execute`: one handler call turned into an Outcome."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import threading
import time
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
from tests.conftest import eventually


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


def process_sleep(payload: Numbers, ctx: TaskContext) -> int:
    """Sleeps `a` tenths of a second and returns its pid."""
    time.sleep(payload.a / 10)
    return os.getpid()


def process_timeout_error(payload: Numbers, ctx: TaskContext) -> None:
    raise TimeoutError("upstream took too long")


def process_exit(payload: Numbers, ctx: TaskContext) -> None:
    os._exit(payload.a)


class Unloadable:
    """Pickles in the child; fails to unpickle in the parent."""

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return _refuse_to_load, ()


def _refuse_to_load() -> None:
    raise TypeError("cannot be loaded here")


def process_unloadable(payload: Numbers, ctx: TaskContext) -> Unloadable:
    return Unloadable()


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


@pytest.fixture(scope="module")
def one_process() -> Iterator[Executor]:
    """An executor with a one-process pool, shared by the process tests (spawning is slow)."""
    ex = Executor(make_settings(process_pool_size=1), "worker-p")
    ex.warm_up([make_type(process_add, "process")])
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
async def test_process_handler_runs_in_another_process_and_retry_survives_pickling(
    one_process: Executor,
) -> None:
    executor = one_process
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


# -- handlers that hang past their timeout ----------------------------------------------------


async def test_a_hung_thread_no_longer_holds_the_pool() -> None:
    executor = Executor(make_settings(concurrency=1), "worker-t")  # one thread
    release = threading.Event()
    hung_threads: list[threading.Thread] = []

    def hang(payload: Numbers, ctx: TaskContext) -> None:
        hung_threads.append(threading.current_thread())
        release.wait(30)

    def quick(payload: Numbers, ctx: TaskContext) -> int:
        return threading.get_ident()

    try:
        outcome = await executor.execute(make_type(hang, "thread", timeout_s=0.1), started())
        assert (outcome.status, outcome.error) == ("queued", "timed out after 0.1 s")
        (hung,) = hung_threads
        assert hung.is_alive()
        # The next call gets a thread of its own at once instead of queueing behind the hung
        # one (where it would time out too).
        outcome = await executor.execute(make_type(quick, "thread", timeout_s=2.0), started())
        assert outcome.status == "succeeded", outcome.error
        assert outcome.result_json is not None
        assert orjson.loads(outcome.result_json) != hung.ident
        assert hung.is_alive()
        assert executor._threads.abandoned == 1
    finally:
        release.set()
        executor.close()

    async def let_go() -> bool:
        return executor._threads.abandoned == 0 and not hung.is_alive()

    await eventually(let_go)


async def test_hung_threads_get_replacements_only_up_to_spare() -> None:
    executor = Executor(make_settings(concurrency=1), "worker-t")  # one thread, one spare
    release = threading.Event()

    def hang(payload: Numbers, ctx: TaskContext) -> None:
        release.wait(30)

    hang_type = make_type(hang, "thread", timeout_s=0.1)
    try:
        for _ in range(2):  # the first is replaced, the second is not
            outcome = await executor.execute(hang_type, started())
            assert outcome.error == "timed out after 0.1 s"
        assert executor._threads.abandoned == 2
        outcome = await executor.execute(hang_type, started())  # waits, never runs
        assert outcome.error == "timed out after 0.1 s"
        assert executor._threads.abandoned == 2
    finally:
        release.set()
        executor.close()


@pytest.mark.slow
async def test_a_hung_process_is_killed_and_the_next_call_runs_at_once(
    one_process: Executor,
) -> None:
    executor = one_process
    first = await executor.execute(make_type(process_sleep, "process"),
                                   started(payload={"a": 0}))
    assert first.result_json is not None
    hung_pid = int(first.result_json)  # the pool's only process, which the next call hangs
    outcome = await executor.execute(make_type(process_sleep, "process", timeout_s=0.3),
                                     started(payload={"a": 600}))
    assert (outcome.status, outcome.error) == ("queued", "timed out after 0.3 s")

    loop = asyncio.get_running_loop()
    began = loop.time()
    outcome = await executor.execute(make_type(process_sleep, "process", timeout_s=20),
                                     started(payload={"a": 0}))
    assert outcome.status == "succeeded", outcome.error
    assert outcome.result_json is not None
    assert int(outcome.result_json) != hung_pid
    assert loop.time() - began < 15  # not behind a 60 s sleep

    async def gone() -> bool:
        try:
            os.kill(hung_pid, 0)
        except ProcessLookupError:
            return True
        return False

    await eventually(gone)


@pytest.mark.slow
async def test_a_process_timeout_counts_from_when_a_process_takes_the_call(
    one_process: Executor,
) -> None:
    executor = one_process
    # Three 0.5 s calls on one process: the last one ends 1.5 s after it was made, past its
    # 1.2 s timeout, having run for only 0.5 s of it.
    task_type = make_type(process_sleep, "process", timeout_s=1.2)
    outcomes = await asyncio.gather(*(
        executor.execute(task_type, started(payload={"a": 5})) for _ in range(3)
    ))
    assert [o.status for o in outcomes] == ["succeeded"] * 3, [o.error for o in outcomes]


@pytest.mark.slow
async def test_a_process_that_dies_or_breaks_the_pool_is_a_failed_attempt(
    one_process: Executor,
) -> None:
    executor = one_process
    add = make_type(process_add, "process")
    outcome = await executor.execute(make_type(process_exit, "process"),
                                     started(payload={"a": 3}))
    assert (outcome.status, outcome.error) == ("queued",
                                               "handler process died (exit code 3)")
    assert (await executor.execute(add, started())).status == "succeeded"

    outcome = await executor.execute(make_type(process_unloadable, "process"), started())
    assert outcome.status == "queued"
    assert outcome.error is not None
    assert outcome.error.startswith("process pool broke")
    outcome = await executor.execute(add, started())  # on a new pool
    assert outcome.status == "succeeded", outcome.error

    outcome = await executor.execute(
        make_type(process_timeout_error, "process", timeout_s=20), started())
    assert outcome.status == "queued"
    assert outcome.error is not None
    assert "TimeoutError: upstream took too long" in outcome.error
    assert "timed out after" not in outcome.error


@pytest.mark.slow
async def test_close_does_not_wait_for_hung_handlers() -> None:
    before = {p.pid for p in multiprocessing.active_children()}
    executor = Executor(make_settings(process_pool_size=1), "worker-p")
    executor.warm_up([make_type(process_sleep, "process")])
    mine = {p.pid for p in multiprocessing.active_children()} - before
    assert len(mine) == 1
    began, release = threading.Event(), threading.Event()

    def hang(payload: Numbers, ctx: TaskContext) -> None:
        began.set()
        release.wait(30)

    hung_process = asyncio.ensure_future(executor.execute(
        make_type(process_sleep, "process"), started(payload={"a": 600})))
    hung_thread = asyncio.ensure_future(executor.execute(make_type(hang, "thread"), started()))

    async def thread_began() -> bool:
        return began.is_set()

    try:
        await eventually(thread_began)
        closing = time.perf_counter()
        executor.close()
        assert time.perf_counter() - closing < 0.5

        async def processes_gone() -> bool:
            return not mine & {p.pid for p in multiprocessing.active_children()}

        await eventually(processes_gone)  # killed, not left to sleep on
    finally:
        release.set()
        hung_process.cancel()
        hung_thread.cancel()
        await asyncio.gather(hung_process, hung_thread, return_exceptions=True)


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
