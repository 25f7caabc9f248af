"""One handler call: async on the loop, blocking in a thread, CPU-bound in a process pool;
with the type's timeout, and its outcome decided (succeeded, retry later, or dead).

A timed-out thread or process handler cannot be killed: the attempt is recorded as timed out
and the function runs on in the background until it returns.
"""

from __future__ import annotations

import asyncio
import functools
import multiprocessing
import signal
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import orjson
from pydantic import BaseModel, ValidationError

from conveyor import metrics
from conveyor.config import Settings
from conveyor.errors import Fail, Retry
from conveyor.registry import Lease, RetryPolicy, TaskContext, TaskType
from conveyor.store.tasks import Outcome, Started

_MAX_ERROR_CHARS = 4000
Pool = ThreadPoolExecutor | ProcessPoolExecutor


def _json_default(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def _ignore_sigint() -> None:
    # Ctrl+C reaches the whole foreground process group; pool children leave it to the parent,
    # which drains them.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def describe(exc: BaseException) -> str:
    """`Type: message` plus the innermost frames, bounded for the last_error column."""
    return "".join(traceback.format_exception(exc, limit=-4))


def storable(text: str) -> str:
    """`text` as Postgres `text` can hold it: no NUL characters, bounded length. (An error
    message is the handler's, or a remote server's, to choose.)"""
    return text.replace("\x00", "\\0")[-_MAX_ERROR_CHARS:]


class Executor:
    """Runs handlers and turns what they do into an `Outcome`."""

    def __init__(self, settings: Settings, worker_id: str) -> None:
        self.settings = settings
        self.worker_id = worker_id
        self.default_retry = RetryPolicy(settings.retry_base_delay, settings.retry_max_delay)
        self._threads = ThreadPoolExecutor(
            max_workers=settings.concurrency, thread_name_prefix="conveyor-task"
        )
        self._processes: ProcessPoolExecutor | None = None

    def warm_up(self, types: list[TaskType]) -> None:
        """Start the process pool now if any type needs it, rather than on its first task."""
        if any(t.run_in == "process" for t in types):
            self._process_pool()

    def _process_pool(self) -> ProcessPoolExecutor:
        if self._processes is None:
            self._processes = ProcessPoolExecutor(
                max_workers=self.settings.process_pool_size,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_ignore_sigint,
            )
        return self._processes

    def close(self) -> None:
        """Release the pools without waiting: the drain has already waited for handlers, and a
        thread still running past it (it cannot be killed) must not block the event loop."""
        self._threads.shutdown(wait=False, cancel_futures=True)
        if self._processes is not None:
            self._processes.shutdown(wait=False, cancel_futures=True)

    async def execute(
        self, task_type: TaskType, started: Started, lease: Lease | None = None
    ) -> Outcome:
        """Run one attempt and decide what becomes of the task."""
        ctx = TaskContext(
            task_id=str(started.id),
            task_type=task_type.name,
            attempt=started.attempt,
            max_attempts=started.max_attempts,
            run_at=started.run_at,
            worker_id=self.worker_id,
            settings=self.settings,
            lease=lease or Lease(),
        )
        try:
            payload = task_type.payload_model.model_validate(started.payload)
        except ValidationError as exc:
            return self._dead(started, f"payload no longer matches {task_type.name}: {exc}")
        meters = metrics.type_meters(task_type.name)
        meters.started.inc()
        began = time.perf_counter()
        pool = self._pool_for(task_type)
        try:
            if task_type.timeout_s is None:  # no Timeout object (and its task lookups) per task
                result = await self._call(task_type, payload, ctx, pool)
            else:
                async with asyncio.timeout(task_type.timeout_s) as scope:
                    result = await self._call(task_type, payload, ctx, pool)
        except Retry as exc:
            return self._retry(task_type, started, f"retry requested: {exc.reason}", exc.delay_s)
        except Fail as exc:
            return self._dead(started, f"failed: {exc.reason}")
        except TimeoutError as exc:
            expired = task_type.timeout_s is not None and scope.expired()
            error = f"timed out after {task_type.timeout_s} s" if expired else describe(exc)
            return self._retry(task_type, started, error, None)
        except BrokenProcessPool as exc:
            if pool is self._processes:  # a child died; the next process task gets a new pool
                self._processes = None
            return self._retry(task_type, started, f"process pool broke: {exc}", None)
        except asyncio.CancelledError as exc:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # this run is being cancelled (drain timeout, forced stop)
            # The handler let out a cancellation of its own (an awaited future someone else
            # cancelled): a failed attempt, not a reason to abandon the task.
            return self._retry(task_type, started, describe(exc) or "cancelled", None)
        except Exception as exc:
            return self._retry(task_type, started, describe(exc), None)
        finally:
            meters.duration.observe(time.perf_counter() - began)
        try:
            result_json = orjson.dumps(result, default=_json_default).decode()
        except orjson.JSONEncodeError as exc:
            return self._dead(started, f"result is not JSON-serialisable: {exc}")
        if "\\u0000" in result_json:
            return self._dead(started, "result holds a NUL character (\\u0000), which "
                                       "Postgres jsonb cannot store")
        return Outcome(started.id, task_type.name, started.attempt, "succeeded",
                       result_json=result_json)

    async def _call(self, task_type: TaskType, payload: BaseModel, ctx: TaskContext,
                    pool: Pool | None) -> Any:
        if pool is None:
            return await task_type.handler(payload, ctx)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(pool, functools.partial(task_type.handler, payload, ctx))

    def _pool_for(self, task_type: TaskType) -> Pool | None:
        if task_type.run_in == "loop":
            return None
        return self._threads if task_type.run_in == "thread" else self._process_pool()

    def _retry(
        self, task_type: TaskType, started: Started, error: str, delay_s: float | None
    ) -> Outcome:
        if started.attempt >= started.max_attempts:
            return self._dead(
                started, f"{error}\n(gave up after {started.attempt} attempts)", task_type.name
            )
        policy = task_type.retry or self.default_retry
        delay = policy.delay_s(started.attempt) if delay_s is None else max(0.0, delay_s)
        return Outcome(started.id, task_type.name, started.attempt, "queued",
                       error=storable(error), delay_s=delay)

    @staticmethod
    def _dead(started: Started, error: str, type_name: str | None = None) -> Outcome:
        return Outcome(started.id, type_name or started.type, started.attempt, "dead",
                       error=storable(error))
