"""`Conveyor`: what an application declares — task types, cron jobs, extra API routes.

    app = Conveyor()

    @app.task("resize", payload=ResizePayload, max_attempts=5, timeout=60)
    async def resize(payload: ResizePayload, ctx: TaskContext) -> dict: ...

    await resize.enqueue(ResizePayload(...))      # typed: the payload must be a ResizePayload

    @app.cron("*/30 * * * * *")
    async def every_half_minute(ctx: TaskContext) -> None: ...
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import os
import sys
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar

from fastapi import APIRouter
from pydantic import BaseModel

from conveyor.canvas import Canvas, Chain, Group, Signature
from conveyor.client import Client, NodeRequest, TaskRequest, insert_in_transaction
from conveyor.errors import ConfigError
from conveyor.registry import (
    CronJob,
    CronTick,
    Limits,
    Registry,
    Retention,
    RetryPolicy,
    TaskContext,
    TaskRate,
    TaskType,
    parse_task_rate,
)
from conveyor.store.keys import SCOPES
from conveyor.store.pool import Connection
from conveyor.store.tasks import TaskRecord, UpstreamFailure
from conveyor.store.workflows import WorkflowRecord

H = TypeVar("H", bound=Callable[..., Any])
P = TypeVar("P", bound=BaseModel)
Params = ParamSpec("Params")
R = TypeVar("R")
T = TypeVar("T")


class TaskDefinition(Generic[P, Params, R]):
    """What `@app.task` returns: still callable as the handler, and a typed producer of its
    tasks (mypy checks the payload's type).

        await resize.enqueue(Resize(url=u, width=128))      # from async code
        resize.enqueue_sync(Resize(url=u, width=128))       # from blocking code (Django, Flask)

    Enqueueing goes through the connections of the process: those of a running Conveyor
    service, of an open `conveyor.producer.Producer`, or of the app's `SyncProducer` (which
    connects at the first such call).
    """

    def __init__(
        self, app: Conveyor, name: str, payload_model: type[P],
        handler: Callable[Concatenate[P, Params], R],
    ) -> None:
        self.app = app
        self.name = name
        self.payload_model = payload_model
        self.handler = handler
        functools.update_wrapper(self, handler)  # __module__, __qualname__, __doc__, __wrapped__

    def __call__(self, payload: P, /, *args: Params.args, **kwargs: Params.kwargs) -> R:
        return self.handler(payload, *args, **kwargs)

    def __repr__(self) -> str:
        return f"<TaskDefinition {self.name!r} of {self.handler!r}>"

    def __reduce__(self) -> str | tuple[Any, ...]:
        # A process pool pickles its handler by module-level name, which now names this object:
        # pickled by that name, it arrives as itself. Registered under another name
        # (`app.task(...)(fn)`), it is pickled as the plain handler, which that name holds.
        qualname: str = getattr(self.handler, "__qualname__", "")
        found: Any = sys.modules.get(self.__module__)
        for part in qualname.split("."):
            found = getattr(found, part, None)
        if found is self:
            return qualname
        return (_same, (self.handler,))

    def request(
        self, payload: P, *, idempotency_key: str | None = None, delay_s: float = 0.0,
        max_attempts: int | None = None,
        priority: str | None = None, unique_for: float | None = None,
        unique_key: str | None = None,
    ) -> TaskRequest:
        """A request for one task of this type (for `Producer.enqueue_many`)."""
        return TaskRequest(self.name, payload, idempotency_key, delay_s, max_attempts,
                           priority, unique_for, unique_key)

    async def enqueue(
        self, payload: P, *, idempotency_key: str | None = None, delay_s: float = 0.0,
        max_attempts: int | None = None,
        priority: str | None = None, unique_for: float | None = None,
        unique_key: str | None = None,
    ) -> TaskRecord:
        """Insert and publish one task; with an idempotency key already used, the first task."""
        request = self.request(payload, idempotency_key=idempotency_key, delay_s=delay_s,
                               max_attempts=max_attempts, priority=priority,
                               unique_for=unique_for, unique_key=unique_key)
        return await self.app.submit(request)

    def s(
        self, payload: P, *, key: str | None = None, max_attempts: int | None = None,
        delay_s: float = 0.0, on_upstream_failure: UpstreamFailure = "cancel",
    ) -> Signature:
        """A signature of one task of this type, for `app.chain`, `app.group` and `>>`
        (`conveyor.canvas`); `key` names its node in the workflow."""
        return Signature(self.name, payload, key, max_attempts, delay_s, on_upstream_failure,
                         app=self.app)

    def enqueue_sync(
        self, payload: P, *, idempotency_key: str | None = None, delay_s: float = 0.0,
        max_attempts: int | None = None,
        priority: str | None = None, unique_for: float | None = None,
        unique_key: str | None = None,
    ) -> TaskRecord:
        """`enqueue` for blocking code: waits for the task to be stored and returns it."""
        request = self.request(payload, idempotency_key=idempotency_key, delay_s=delay_s,
                               max_attempts=max_attempts, priority=priority,
                               unique_for=unique_for, unique_key=unique_key)
        return self.app.submit_sync(request)


def _same(value: T) -> T:
    return value


def _rate(value: str | TaskRate | None) -> TaskRate | None:
    return parse_task_rate(value) if isinstance(value, str) else value


class Conveyor:
    """A registry of task types and cron jobs, plus routers to mount on the HTTP API."""

    def __init__(self) -> None:
        self.registry = Registry()
        # (router, prefix, scope its routes need: None for none, not even a key)
        self.routers: list[tuple[APIRouter, str, str | None]] = []
        # Clients of the process's open states, newest last, each with the loop it lives on
        # and the process that opened it (a forked child inherits the list, not the loops).
        self._states: list[tuple[Client, asyncio.AbstractEventLoop, int]] = []
        self._connect: Callable[[], None] | None = None  # a SyncProducer's open(), blocking

    def task(
        self,
        name: str,
        *,
        payload: type[P],
        max_attempts: int | None = None,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
        process: bool = False,
        description: str | None = None,
        strict: bool = True,
        retention: Retention | float | None = None,
        max_concurrency: int | None = None,
        concurrency_key: str | None = None,
        max_concurrency_per_key: int | None = None,
        rate_limit: str | TaskRate | None = None,
        rate_limit_per_key: str | TaskRate | None = None,
        priorities: bool = False,
    ) -> Callable[[Callable[Concatenate[P, Params], R]], TaskDefinition[P, Params, R]]:
        """Register a handler `(payload, ctx) -> result` for task type `name`; returns its
        `TaskDefinition` (callable as the handler, with `enqueue` and `enqueue_sync`).

        Coroutine functions run on the event loop; plain functions run in a thread, or in a
        process pool with `process=True` (CPU-bound work; the function must be importable).
        `timeout` is seconds per attempt; the result must be JSON-serialisable (or a model).

        A payload given as JSON (over HTTP, or as a mapping) is validated in pydantic's strict
        mode, as its schema reads: `"5"` or `true` is no integer, `5` no string. `strict=False`
        lets pydantic coerce them instead, for clients that send numbers as strings.
        `retention` keeps this type's finished tasks that many seconds (or per status, a
        `Retention`) instead of the `CONVEYOR_RETENTION_*` settings; 0 keeps them forever.

        Flow control (README, Flow control; each overridable at run time through the API):
        `max_concurrency` handlers at once across every worker; `max_concurrency_per_key` per
        value of `concurrency_key` (a payload path, `payload.tenant_id`); `rate_limit` starts
        (`"100/s"`, `"6000/m burst=50"`) across every worker, `rate_limit_per_key` per key.
        `priorities=True` lets each task carry a priority (`high`, `default`, `low`).
        """

        kept = Retention.of(retention)
        if (max_concurrency_per_key is not None or rate_limit_per_key is not None) \
                and concurrency_key is None:
            raise ConfigError(f"task type {name!r}: max_concurrency_per_key and "
                              "rate_limit_per_key need a concurrency_key (a payload path such "
                              "as 'payload.tenant_id')")
        try:
            limits = Limits(
                max_concurrency=max_concurrency, concurrency_key=concurrency_key,
                max_concurrency_per_key=max_concurrency_per_key,
                rate_limit=_rate(rate_limit), rate_limit_per_key=_rate(rate_limit_per_key))
        except (ConfigError, ValueError) as exc:
            raise ConfigError(f"task type {name!r}: {exc}") from None

        def register(
            handler: Callable[Concatenate[P, Params], R],
        ) -> TaskDefinition[P, Params, R]:
            is_async = inspect.iscoroutinefunction(handler)
            if process and is_async:
                raise ConfigError(f"task type {name!r}: process handlers must be plain functions")
            definition = TaskDefinition(self, name, payload, handler)
            self.registry.add(
                TaskType(
                    name=name,
                    payload_model=payload,
                    # Pickled by name for the process pool: see TaskDefinition.__reduce__.
                    handler=definition if process else handler,
                    run_in="loop" if is_async else ("process" if process else "thread"),
                    max_attempts=max_attempts,
                    timeout_s=timeout,
                    retry=retry,
                    description=description or inspect.getdoc(handler) or "",
                    strict=strict,
                    retention=kept,
                    limits=limits,
                    priorities=priorities,
                )
            )
            return definition

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

    def include_router(self, router: APIRouter, prefix: str = "", *,
                       scope: str | None = "tasks:read") -> None:
        """Mount an application's own routes on the Conveyor API (with its middleware).

        Callers need an API key holding `scope` (`tasks:read` by default; `admin` holds every
        scope); `scope=None` makes the routes public, needing no key at all."""
        if scope is not None and scope not in SCOPES:
            raise ConfigError(f"include_router(scope={scope!r}): scopes are "
                              f"{', '.join(SCOPES)} (or None for public routes)")
        self.routers.append((router, prefix, scope))

    def bind(self, client: Client) -> None:
        """Attach an open state's client, on the running loop (done by `open_state`)."""
        self._states.append((client, asyncio.get_running_loop(), os.getpid()))

    def unbind(self, client: Client) -> None:
        """Detach `client` when its state closes; an earlier one still open takes over."""
        self._states = [entry for entry in self._states if entry[0] is not client]

    @property
    def _bound(self) -> list[tuple[Client, asyncio.AbstractEventLoop]]:
        pid = os.getpid()
        return [(client, loop) for client, loop, owner in self._states if owner == pid]

    def connect_on_demand(self, connect: Callable[[], None] | None) -> None:
        """Have `connect` (blocking; it must bind a client) called when a task is enqueued
        through a definition and no client is bound: how a `SyncProducer` opens lazily.
        None forgets it."""
        self._connect = connect

    def _binding(self) -> tuple[Client, asyncio.AbstractEventLoop]:
        if not self._bound and self._connect is not None:
            self._connect()
        if not self._bound:
            raise ConfigError(
                "no Conveyor connections in this process: run inside a Conveyor service, or "
                "open a conveyor.producer.Producer(app) (or SyncProducer) first"
            )
        return self._bound[-1]

    async def submit(self, request: TaskRequest) -> TaskRecord:
        """Enqueue `request` through the process's connections (see `TaskDefinition`)."""
        if not self._bound and self._connect is not None:
            await asyncio.to_thread(self._connect)  # connecting blocks: not on this loop
        client, loop = self._binding()
        if loop is asyncio.get_running_loop():
            return (await client.enqueue_many([request]))[0].record
        # Opened on another loop (a SyncProducer's thread): run it there.
        return await asyncio.wrap_future(
            asyncio.run_coroutine_threadsafe(_record_of(client, request), loop)
        )

    def chain(self, *parts: Canvas) -> Chain:
        """Parts (signatures, chains, groups) one after the other: see `conveyor.canvas`."""
        return Chain(tuple(parts), app=self)

    def group(self, *parts: Canvas) -> Group:
        """Parts side by side; `app.group(...) >> callback` runs the callback after all."""
        return Group(tuple(parts), app=self)

    async def submit_workflow(
        self, nodes: Sequence[NodeRequest], *, name: str | None = None
    ) -> WorkflowRecord:
        """Create a workflow through the process's connections (see `TaskDefinition`)."""
        if not self._bound and self._connect is not None:
            await asyncio.to_thread(self._connect)
        client, loop = self._binding()
        work = client.create_workflow(nodes, name)
        if loop is asyncio.get_running_loop():
            return await work
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(work, loop))

    def submit_sync(self, request: TaskRequest) -> TaskRecord:
        """`submit` for blocking code, which must not run on the loop serving the connections
        (that would wait on itself): from there, await `submit` instead."""
        client, loop = self._binding()
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            raise ConfigError(
                f"enqueue_sync({request.type!r}) called on the event loop that serves "
                "Conveyor's connections would block it: await enqueue(...) there"
            )
        return asyncio.run_coroutine_threadsafe(_record_of(client, request), loop).result()

    async def enqueue(
        self,
        conn: Connection,
        type_: str,
        payload: BaseModel | Mapping[str, Any],
        *,
        idempotency_key: str | None = None,
        delay_s: float = 0.0,
        max_attempts: int | None = None,
        priority: str | None = None, unique_for: float | None = None,
        unique_key: str | None = None,
    ) -> TaskRecord:
        """Insert a task inside the caller's transaction on `conn`.

        Commit, and the task runs; roll back, and it never existed: no row, no message.
        """
        if not self._bound:
            raise ConfigError("Conveyor.enqueue needs a running Conveyor process (state not open)")
        request = TaskRequest(type_, payload, idempotency_key, delay_s, max_attempts, priority,
                              unique_for, unique_key)
        return await insert_in_transaction(self._binding()[0], conn, request)


def _record_of(client: Client, request: TaskRequest) -> Coroutine[Any, Any, TaskRecord]:
    async def run() -> TaskRecord:
        return (await client.enqueue_many([request]))[0].record
    return run()
