"""Producers: enqueue an application's tasks from a process that runs no Conveyor service (a
Django or Flask app, a script), straight into PostgreSQL and Redis.

    async with Producer(app) as producer:             # DATABASE_URL, REDIS_URL from the env
        await resize.enqueue(Resize(url=u, width=128))

    producer = SyncProducer(app)                      # blocking code; connects at first use
    producer.enqueue(resize, Resize(url=u, width=128))  # or resize.enqueue_sync(Resize(...))

Neither applies migrations unless `migrate=True`: the schema belongs to the services, and a
producer finding it missing or behind stops with a `ConfigError` that says to migrate.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import os
import threading
import uuid
from collections.abc import Callable, Coroutine, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar, overload

from pydantic import BaseModel

from conveyor.application import Conveyor, TaskDefinition
from conveyor.client import TaskRequest
from conveyor.config import Settings, load_settings
from conveyor.errors import ConfigError
from conveyor.state import AppState, open_state
from conveyor.store.migrate import pending
from conveyor.store.tasks import TaskRecord

P = TypeVar("P", bound=BaseModel)
T = TypeVar("T")
DEFAULT_POOL_SIZE = 2  # Postgres connections per producer: enqueues share batched INSERTs


class Producer:
    """Async producer with connections of its own, opened at first use on the caller's loop.

    While open, the app's task definitions (`await resize.enqueue(...)`) use it too.
    `settings` default to the environment; `pool_size` caps its Postgres connections.
    Leaving `async with`, or `aclose()`, closes the connections.
    """

    def __init__(
        self, app: Conveyor, settings: Settings | None = None, *,
        migrate: bool = False, pool_size: int = DEFAULT_POOL_SIZE,
    ) -> None:
        self.app = app
        self._settings = settings
        self.migrate = migrate
        self.pool_size = pool_size
        self._state: AppState | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._opening = asyncio.Lock()

    async def open(self) -> AppState:
        """Connect (once) and return the open state; done by every method."""
        if self._state is not None:
            return self._state
        async with self._opening:
            if self._state is None:
                settings = (self._settings or load_settings()).model_copy(
                    update={"pg_pool_min": 1, "pg_pool_max": self.pool_size}
                )
                async with contextlib.AsyncExitStack() as stack:
                    state = await stack.enter_async_context(
                        open_state(settings, self.app, apply_migrations=self.migrate)
                    )
                    missing = await pending(state.pool, settings.database_schema)
                    if missing:
                        raise ConfigError(
                            f"database schema {settings.database_schema!r} lacks migrations "
                            f"{missing}: run `conveyor migrate` (or start a Conveyor service) "
                            "first, or pass migrate=True"
                        )
                    self._stack = stack.pop_all()
                    self._state = state
        return self._state

    async def aclose(self) -> None:
        """Close the connections; the next call opens them again."""
        stack, self._stack, self._state = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    async def __aenter__(self) -> Producer:
        await self.open()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    @overload
    async def enqueue(
        self, task: TaskDefinition[P, ..., Any], payload: P, *,
        idempotency_key: str | None = None, delay_s: float = 0.0,
        max_attempts: int | None = None,
        priority: str | None = None, unique_for: float | None = None,
        unique_key: str | None = None,
    ) -> TaskRecord: ...

    @overload
    async def enqueue(
        self, task: str, payload: BaseModel | Mapping[str, Any], *,
        idempotency_key: str | None = None, delay_s: float = 0.0,
        max_attempts: int | None = None,
        priority: str | None = None, unique_for: float | None = None,
        unique_key: str | None = None,
    ) -> TaskRecord: ...

    async def enqueue(
        self, task: TaskDefinition[Any, ..., Any] | str, payload: BaseModel | Mapping[str, Any],
        *, idempotency_key: str | None = None, delay_s: float = 0.0,
        max_attempts: int | None = None,
        priority: str | None = None, unique_for: float | None = None,
        unique_key: str | None = None,
    ) -> TaskRecord:
        """Insert and publish one task, given its definition (typed) or its type's name (the
        payload then a mapping, validated here); raises PayloadInvalid or UnknownTaskType."""
        name = task if isinstance(task, str) else task.name
        request = TaskRequest(name, payload, idempotency_key, delay_s, max_attempts, priority,
                              unique_for, unique_key)
        return (await self.enqueue_many([request]))[0]

    async def enqueue_many(self, requests: Sequence[TaskRequest]) -> list[TaskRecord]:
        """Enqueue tasks in one transaction (all or none) and one Redis pipeline."""
        state = await self.open()
        return [i.record for i in await state.client.enqueue_many(requests)]

    async def get(self, task_id: uuid.UUID | str) -> TaskRecord:
        """Read a task; raises TaskNotFound."""
        state = await self.open()
        return await state.client.get(uuid.UUID(str(task_id)))


class SyncProducer:
    """The blocking form of `Producer`, for Django views, Flask routes and scripts: safe to
    share between threads, and to create at import time (it connects at first use).

    Its connections live on an event loop in a thread of its own, closed by `close()`, by
    leaving `with`, or at interpreter exit. In a forked child (a pre-forking server) it
    connects anew. The app's task definitions use it too (`resize.enqueue_sync(...)`), and
    connect it when they need it.
    """

    def __init__(
        self, app: Conveyor, settings: Settings | None = None, *,
        migrate: bool = False, pool_size: int = DEFAULT_POOL_SIZE,
    ) -> None:
        self._make: Callable[[], Producer] = functools.partial(
            Producer, app, settings, migrate=migrate, pool_size=pool_size
        )
        self._lock = threading.Lock()
        self._running: tuple[int, _LoopThread, Producer] | None = None
        app.connect_on_demand(self.open)

    def open(self) -> None:
        """Connect now rather than at the first call."""
        self._call(lambda producer: producer.open())

    def _call(self, work: Callable[[Producer], Coroutine[Any, Any, T]]) -> T:
        with self._lock:
            if self._running is None or self._running[0] != os.getpid():
                thread, producer = _LoopThread(), self._make()
                try:
                    thread.run(producer.open())
                except BaseException:
                    thread.stop()
                    raise
                self._running = (os.getpid(), thread, producer)
                atexit.register(self.close)
            _, thread, producer = self._running
        return thread.run(work(producer))

    def close(self) -> None:
        """Close the connections and stop the thread; the next call opens them again."""
        with self._lock:
            running, self._running = self._running, None
        atexit.unregister(self.close)
        if running is None or running[0] != os.getpid():
            return  # nothing open, or opened by the parent before a fork: not ours to close
        _, thread, producer = running
        try:
            thread.run(producer.aclose())
        finally:
            thread.stop()

    def __enter__(self) -> SyncProducer:
        self.open()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @overload
    def enqueue(
        self, task: TaskDefinition[P, ..., Any], payload: P, *,
        idempotency_key: str | None = None, delay_s: float = 0.0,
        max_attempts: int | None = None,
        priority: str | None = None, unique_for: float | None = None,
        unique_key: str | None = None,
    ) -> TaskRecord: ...

    @overload
    def enqueue(
        self, task: str, payload: BaseModel | Mapping[str, Any], *,
        idempotency_key: str | None = None, delay_s: float = 0.0,
        max_attempts: int | None = None,
        priority: str | None = None, unique_for: float | None = None,
        unique_key: str | None = None,
    ) -> TaskRecord: ...

    def enqueue(
        self, task: TaskDefinition[Any, ..., Any] | str, payload: BaseModel | Mapping[str, Any],
        *, idempotency_key: str | None = None, delay_s: float = 0.0,
        max_attempts: int | None = None,
        priority: str | None = None, unique_for: float | None = None,
        unique_key: str | None = None,
    ) -> TaskRecord:
        """See `Producer.enqueue`; returns once the task is stored."""
        name = task if isinstance(task, str) else task.name
        request = TaskRequest(name, payload, idempotency_key, delay_s, max_attempts, priority,
                              unique_for, unique_key)
        return self.enqueue_many([request])[0]

    def enqueue_many(self, requests: Sequence[TaskRequest]) -> list[TaskRecord]:
        """See `Producer.enqueue_many`."""
        return self._call(lambda producer: producer.enqueue_many(requests))

    def get(self, task_id: uuid.UUID | str) -> TaskRecord:
        """See `Producer.get`."""
        return self._call(lambda producer: producer.get(task_id))


class _LoopThread:
    """An event loop on a daemon thread: it never holds up interpreter exit, and lives until
    the `atexit` hook has closed the connections on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="conveyor-producer",
                                       daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()
