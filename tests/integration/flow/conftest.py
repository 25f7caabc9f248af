"""Fixtures of the flow control tests: the flow test app, settings for several workers in one
process, and workers started in the background."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest

from conveyor.api.app import create_app
from conveyor.application import Conveyor
from conveyor.config import Settings
from conveyor.runtime.shutdown import Shutdown
from conveyor.state import AppState
from conveyor.testing.servers import PostgresServer, RedisServer
from conveyor.worker.worker import Worker
from tests.apps import flow
from tests.apps.flow import key
from tests.conftest import make_settings


@pytest.fixture
def app() -> Conveyor:
    return flow.app


@pytest.fixture
def settings(postgres: PostgresServer, redis_server: RedisServer) -> Settings:
    # Three workers in one process pin two connections each.
    return make_settings(postgres, redis_server.url, pg_pool_max=20)


StartWorker = Callable[..., Awaitable[Worker]]


@pytest.fixture
async def start_worker(state: AppState) -> AsyncIterator[StartWorker]:
    """Workers running in the background (of `state=`, to run one with other settings);
    drained at teardown."""
    running: list[tuple[Shutdown, asyncio.Task[None]]] = []

    async def start(*, state: AppState = state, **kwargs: Any) -> Worker:
        worker = Worker(state, **kwargs)
        shutdown = Shutdown(state.settings.drain_timeout)
        running.append((shutdown, asyncio.create_task(worker.run(shutdown))))
        return worker

    yield start
    for shutdown, _ in running:
        shutdown.begin("test over")
    for _, task in running:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 15)


async def number(state: AppState, *parts: str) -> int:
    """A counter the flow test app keeps (`running:<type>`, `peak:<type>`)."""
    return int(await state.redis.get(key(state.settings.key_prefix, *parts)) or 0)


async def peak(state: AppState, scope: str) -> int:
    return int(await state.redis.get(key(state.settings.key_prefix, "peak", scope)) or 0)


async def finished(state: AppState, ids: list[Any]) -> bool:
    rows = await state.pool.fetch(
        f"SELECT status FROM {state.settings.database_schema}.tasks WHERE id = ANY($1::uuid[])",
        ids)
    return len(rows) == len(ids) and all(r[0] == "succeeded" for r in rows)


@pytest.fixture
async def api(state: AppState) -> AsyncIterator[httpx.AsyncClient]:
    """The API of `state`, in process (open mode: every scope)."""
    transport = httpx.ASGITransport(app=create_app(state))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        yield http


def with_concurrency(state: AppState, n: int) -> AppState:
    return dataclasses.replace(state, settings=state.settings.model_copy(update={
        "concurrency": n}))


async def order(state: AppState) -> list[str]:
    raw = await state.redis.lrange(key(state.settings.key_prefix, "order"), 0, -1)
    return [x.decode() if isinstance(x, bytes) else x for x in raw]
