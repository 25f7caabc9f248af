"""`Conveyor`: what an application declares — task types, cron jobs, extra API routes.

    app = Conveyor()

    @app.task("resize", payload=ResizePayload, max_attempts=5, timeout=60)
    async def resize(payload: ResizePayload, ctx: TaskContext) -> dict: ...

    @app.cron("*/30 * * * * *")
    async def every_half_minute(ctx: TaskContext) -> None: ...
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from fastapi import APIRouter
from pydantic import BaseModel

from conveyor.client import Client, TaskRequest, insert_in_transaction
from conveyor.errors import ConfigError
from conveyor.registry import CronJob, CronTick, Registry, RetryPolicy, TaskContext, TaskType
from conveyor.store.pool import Connection
from conveyor.store.tasks import TaskRecord

H = TypeVar("H", bound=Callable[..., Any])


class Conveyor:
    """A registry of task types and cron jobs, plus routers to mount on the HTTP API."""

    def __init__(self) -> None:
        self.registry = Registry()
        self.routers: list[tuple[APIRouter, str]] = []
        self._client: Client | None = None

    def task(
        self,
        name: str,
        *,
        payload: type[BaseModel],
        max_attempts: int | None = None,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
        process: bool = False,
        description: str | None = None,
    ) -> Callable[[H], H]:
        """Register a handler `(payload, ctx) -> result` for task type `name`.

        Coroutine functions run on the event loop; plain functions run in a thread, or in a
        process pool with `process=True` (CPU-bound work; the function must be importable).
        `timeout` is seconds per attempt; the result must be JSON-serialisable (or a model).
        """

        def register(handler: H) -> H:
            is_async = inspect.iscoroutinefunction(handler)
            if process and is_async:
                raise ConfigError(f"task type {name!r}: process handlers must be plain functions")
            self.registry.add(
                TaskType(
                    name=name,
                    payload_model=payload,
                    handler=handler,
                    run_in="loop" if is_async else ("process" if process else "thread"),
                    max_attempts=max_attempts,
                    timeout_s=timeout,
                    retry=retry,
                    description=description or inspect.getdoc(handler) or "",
                )
            )
            return handler

        return register

    def cron(
        self,
        expression: str,
        *,
        name: str | None = None,
        timeout: float | None = None,
        max_attempts: int = 1,
    ) -> Callable[[H], H]:
        """Run `handler(ctx)` once per slot of a six-field cron expression (seconds first).

        Each slot becomes one task of type `name` (default: the function's name), enqueued with
        the slot as its idempotency key, so any number of cron processes fire it once.
        """

        def register(handler: H) -> H:
            job_name = name or handler.__name__
            adapter: Callable[..., Any]
            if inspect.iscoroutinefunction(handler):
                async def run_async(payload: CronTick, ctx: TaskContext) -> Any:
                    return await handler(ctx)
                adapter = run_async
            else:
                def run_sync(payload: CronTick, ctx: TaskContext) -> Any:
                    return handler(ctx)
                adapter = run_sync
            task_type = TaskType(
                name=job_name,
                payload_model=CronTick,
                handler=adapter,
                run_in="loop" if inspect.iscoroutinefunction(handler) else "thread",
                max_attempts=max_attempts,
                timeout_s=timeout,
                description=inspect.getdoc(handler) or f"cron job {expression}",
            )
            self.registry.add_cron(CronJob(job_name, expression), task_type)
            return handler

        return register

    def include_router(self, router: APIRouter, prefix: str = "") -> None:
        """Mount an application's own routes on the Conveyor API (with its middleware)."""
        self.routers.append((router, prefix))

    def bind(self, client: Client) -> None:
        """Attach the running process's client (done by the composition root)."""
        self._client = client

    async def enqueue(
        self,
        conn: Connection,
        type_: str,
        payload: BaseModel | Mapping[str, Any],
        *,
        idempotency_key: str | None = None,
        delay_s: float = 0.0,
        max_attempts: int | None = None,
    ) -> TaskRecord:
        """Insert a task inside the caller's transaction on `conn`.

        Commit, and the task runs; roll back, and it never existed: no row, no message.
        """
        if self._client is None:
            raise ConfigError("Conveyor.enqueue needs a running Conveyor process (state not open)")
        request = TaskRequest(type_, payload, idempotency_key, delay_s, max_attempts)
        return await insert_in_transaction(self._client, conn, request)
