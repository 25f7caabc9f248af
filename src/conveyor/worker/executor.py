"""One handler call: async on the loop, blocking in a thread, CPU-bound in a process pool;
with the type's timeout, and its outcome decided (succeeded, retry later, or dead).

A timed-out coroutine handler is cancelled; a timed-out process handler is killed; a timed-out
thread handler runs on in the background (see `conveyor.worker.pools`). Either way the attempt
is recorded as failed, `timed out after N s`.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import time
import traceback
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import orjson
from pebble import ProcessExpired
from pydantic import BaseModel, ValidationError

from conveyor import metrics, tracing
from conveyor.config import Settings
from conveyor.egress.client import OutboundHttp
from conveyor.egress.policy import EgressPolicy
from conveyor.errors import Fail, Retry
from conveyor.registry import (
    Lease,
    ProgressSink,
    Relatives,
    RetryPolicy,
    TaskContext,
    TaskType,
)
from conveyor.store.tasks import AttemptOutcome, Outcome, Started
from conveyor.worker.pools import ProcessPool, ThreadPool, TimedOut

_MAX_ERROR_CHARS = 4000


def _json_default(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def describe(exc: BaseException) -> str:
    """`Type: message` plus the innermost frames, bounded for the last_error column."""
    return "".join(traceback.format_exception(exc, limit=-4))


def storable(text: str) -> str:
    """`text` as Postgres `text` can hold it: no NUL characters, bounded length. (An error
    message is the handler's, or a remote server's, to choose.)"""
    return text.replace("\x00", "\\0")[-_MAX_ERROR_CHARS:]


class Executor:
    """Runs handlers and turns what they do into an `Outcome`."""

    def __init__(self, settings: Settings, worker_id: str,
                 http: OutboundHttp | None = None,
                 progress: ProgressSink | None = None,
                 relatives: Relatives | None = None) -> None:
        self.settings = settings
        self.relatives = relatives
        self.worker_id = worker_id
        self.http = http or OutboundHttp(EgressPolicy.from_settings(settings))
        self.progress = progress
        self.default_retry = RetryPolicy(settings.retry_base_delay, settings.retry_max_delay)
        # A hung thread call is replaced by a fresh thread, up to `concurrency` at once.
        self._threads = ThreadPool(settings.concurrency, spare=settings.concurrency)
        self._processes = ProcessPool(settings.process_pool_size, progress=progress)

    def warm_up(self, types: list[TaskType]) -> None:
        """Start the process pool now if any type needs it, rather than on its first task."""
        if any(t.run_in == "process" for t in types):
            self._processes.start()

    def threads_running(self) -> list[Future[Any]]:
        """Thread handler calls still running (a thread cannot be stopped)."""
        return self._threads.running()

    def close(self) -> None:
        """Release the pools without blocking the event loop: the drain has already waited
        for handlers; a thread still running past it (it cannot be killed) is left to end, a
        process is killed."""
        self._threads.close()
        self._processes.close()

    async def traced(
        self, task_type: TaskType, started: Started, lease: Lease | None = None
    ) -> Outcome:
        """`execute` in a span that is a child of the one that enqueued the task (tracing on:
        see `conveyor.tracing`)."""
        with tracing.attempt_span(started, self.worker_id) as span:
            outcome = await self.execute(task_type, started, lease)
            tracing.outcome(span, outcome.status, outcome.error)
            return outcome

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
            lease=lease or Lease(self.progress),
            http=self.http,
            **({"relatives": self.relatives}
               if self.relatives is not None and task_type.run_in != "process" else {}),
        )
        try:
            payload = task_type.payload_model.model_validate(started.payload)
        except ValidationError as exc:
            return self._dead(started, f"payload no longer matches {task_type.name}: {exc}")
        meters = metrics.type_meters(task_type.name)
        meters.started.inc()
        began = time.perf_counter()
        try:
            result = await self._call(task_type, payload, ctx)
        except TimedOut as exc:
            if ctx.lease.cancel_requested:
                return self._cancelled(started)
            return self._retry(task_type, started, str(exc), None, kind="timed_out")
        except Retry as exc:
            return self._retry(task_type, started, f"retry requested: {exc.reason}", exc.delay_s)
        except Fail as exc:
            return self._dead(started, f"failed: {exc.reason}")
        except BrokenProcessPool as exc:  # the next process call gets a new pool
            return self._retry(task_type, started, f"process pool broke: {exc}", None)
        except ProcessExpired as exc:  # pebble has already replaced the process
            return self._retry(task_type, started,
                               f"handler process died (exit code {exc.exitcode})", None)
        except asyncio.CancelledError as exc:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                if ctx.lease.cancel_requested and not ctx.lease.lost:
                    current.uncancel()  # the cancel asked for: the attempt ends cancelled
                    return self._cancelled(started)
                raise  # this run is being cancelled (drain timeout, forced stop)
            # The handler let out a cancellation of its own (an awaited future someone else
            # cancelled): a failed attempt, not a reason to abandon the task.
            return self._retry(task_type, started, describe(exc) or "cancelled", None)
        except Exception as exc:
            tracing.failed(exc)
            if ctx.lease.cancel_requested:
                return self._cancelled(started)
            return self._retry(task_type, started, describe(exc), None)
        finally:
            meters.duration.observe(time.perf_counter() - began)
        if ctx.lease.cancel_requested:  # it returned once asked to stop: cancelled too
            return self._cancelled(started)
        try:
            result_json = orjson.dumps(result, default=_json_default).decode()
        except orjson.JSONEncodeError as exc:
            return self._dead(started, f"result is not JSON-serialisable: {exc}")
        if "\\u0000" in result_json:
            return self._dead(started, "result holds a NUL character (\\u0000), which "
                                       "Postgres jsonb cannot store")
        return Outcome(started.id, task_type.name, started.attempt, "succeeded",
                       result_json=result_json)

    async def _call(self, task_type: TaskType, payload: BaseModel, ctx: TaskContext) -> Any:
        timeout_s = task_type.timeout_s
        if task_type.run_in == "loop":
            if timeout_s is None:  # no Timeout object (and its task lookups) per task
                return await task_type.handler(payload, ctx)
            try:
                async with asyncio.timeout(timeout_s) as scope:
                    return await task_type.handler(payload, ctx)
            except TimeoutError:
                if scope.expired():
                    raise TimedOut(timeout_s) from None
                raise  # the handler's own TimeoutError
        if task_type.run_in == "process":
            return await self._processes.run(task_type.handler, payload, ctx,
                                             timeout_s=timeout_s)
        handler = task_type.handler
        if tracing.enabled():  # the thread sees the attempt's span: its enqueues continue it
            handler = functools.partial(contextvars.copy_context().run, handler)
        return await self._threads.run(handler, payload, ctx, timeout_s=timeout_s)

    def _retry(
        self, task_type: TaskType, started: Started, error: str, delay_s: float | None,
        kind: AttemptOutcome = "failed",
    ) -> Outcome:
        if started.attempt >= started.max_attempts:
            return self._dead(
                started, f"{error}\n(gave up after {started.attempt} attempts)", task_type.name,
                kind=kind,
            )
        policy = task_type.retry or self.default_retry
        delay = policy.delay_s(started.attempt) if delay_s is None else max(0.0, delay_s)
        return Outcome(started.id, task_type.name, started.attempt, "queued",
                       error=storable(error), delay_s=delay, kind=kind)

    @staticmethod
    def _dead(started: Started, error: str, type_name: str | None = None,
              kind: AttemptOutcome = "failed") -> Outcome:
        return Outcome(started.id, type_name or started.type, started.attempt, "dead",
                       error=storable(error), kind=kind)

    @staticmethod
    def _cancelled(started: Started) -> Outcome:
        return Outcome(started.id, started.type, started.attempt, "cancelled",
                       error="cancelled on request", kind="cancelled")
