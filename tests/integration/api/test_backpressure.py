"""When Postgres cannot keep up, clients get 503 + Retry-After, not an ever-growing queue."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest

from conveyor.api.app import create_app
from conveyor.application import Conveyor
from conveyor.config import Settings
from conveyor.state import AppState, open_state

BODY = {"type": "echo", "payload": {}}


@pytest.fixture
async def stalled(settings: Settings) -> AsyncIterator[asyncpg.Connection[Any]]:
    """A connection holding an exclusive lock on the tasks table: every insert waits."""
    assert settings.database_url
    conn: asyncpg.Connection[Any] = await asyncpg.connect(settings.database_url)
    yield conn
    await conn.close()


async def lock_tasks(conn: asyncpg.Connection[Any], state: AppState) -> Any:
    tx = conn.transaction()
    await tx.start()
    await conn.execute(f"LOCK TABLE {state.store.table} IN ACCESS EXCLUSIVE MODE")
    return tx


async def both_waiting_on_the_lock(settings: Settings) -> None:
    """Until two sessions wait for a lock on this test's schema (asked on a connection of its
    own: a transaction sees pg_stat_activity as it was at its first read)."""
    assert settings.database_url
    conn: asyncpg.Connection[Any] = await asyncpg.connect(settings.database_url)
    waiting = ("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
               " AND position($1 in query) > 0")
    try:
        async with asyncio.timeout(30):
            while True:
                if await conn.fetchval(waiting, settings.database_schema + ".") >= 2:
                    return
                await asyncio.sleep(0.01)
    finally:
        await conn.close()


async def test_requests_past_the_pending_bound_get_503(
    settings: Settings, app: Conveyor, stalled: asyncpg.Connection[Any]
) -> None:
    tight = settings.model_copy(update={"api_max_pending": 2})
    async with open_state(tight, app) as state:
        api = create_app(state)
        transport = httpx.ASGITransport(app=api)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            tx = await lock_tasks(stalled, state)
            waiting = [asyncio.create_task(http.post("/v1/tasks", json=BODY)) for _ in range(2)]
            async with asyncio.timeout(30):  # both inside (a first request can be slow)
                while api.state.admission.inside < 2:  # noqa: ASYNC110 - a counter, no event
                    await asyncio.sleep(0.01)
            refused = await asyncio.gather(*(http.post("/v1/tasks", json=BODY)
                                             for _ in range(3)))
            assert [r.status_code for r in refused] == [503, 503, 503]
            assert all(r.headers["retry-after"] == "1" for r in refused)
            assert "API_MAX_PENDING" in refused[0].json()["detail"]
            await tx.rollback()
            accepted = await asyncio.gather(*waiting)
            assert [r.status_code for r in accepted] == [202, 202]
            count = await state.pool.fetchval(f"SELECT count(*) FROM {state.store.table}")
            assert count == 2
            after = await http.post("/v1/tasks", json=BODY)
            assert after.status_code == 202
        await state.pool.execute(f"DROP SCHEMA {tight.database_schema} CASCADE")


async def test_an_exhausted_pool_is_503_not_an_endless_wait(
    settings: Settings, app: Conveyor, stalled: asyncpg.Connection[Any]
) -> None:
    tight = settings.model_copy(update={"pg_pool_min": 1, "pg_pool_max": 2,
                                        "pg_acquire_timeout": 0.3})
    async with open_state(tight, app) as state:
        transport = httpx.ASGITransport(app=create_app(state))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            tx = await lock_tasks(stalled, state)
            # Both connections end up waiting on the lock: the enqueue path's own, and a read.
            holding = [asyncio.create_task(http.post("/v1/tasks", json=BODY)),
                       asyncio.create_task(http.get("/v1/tasks"))]
            # Both pool connections blocked on the lock (a first request can be slow; and a
            # request may borrow a connection briefly before the one it blocks on).
            await both_waiting_on_the_lock(tight)
            starved = await http.get(f"/v1/tasks/{uuid.uuid4()}")
            assert starved.status_code == 503
            assert starved.headers["retry-after"]
            assert "no Postgres connection free" in starved.json()["detail"]
            await tx.rollback()
            assert [r.status_code for r in await asyncio.gather(*holding)] == [202, 200]
        await state.pool.execute(f"DROP SCHEMA {tight.database_schema} CASCADE")
