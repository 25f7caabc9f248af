from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from conveyor.application import Conveyor
from conveyor.config import Settings
from conveyor.cron.relay import Relay
from conveyor.runtime.shutdown import Shutdown
from conveyor.state import AppState
from conveyor.testing.servers import PostgresServer, RedisServer
from conveyor.worker.worker import Worker
from tests.apps import flows
from tests.conftest import judge, make_settings


@pytest.fixture
def settings(postgres: PostgresServer, redis_server: RedisServer) -> Settings:
    # Room for the handlers' own reads (ctx.upstream) beside the pinned connections.
    return make_settings(postgres, redis_server.url, pg_pool_max=12, concurrency=20)


@pytest.fixture
def app() -> Conveyor:
    flows.runs.clear()
    return flows.app


@pytest.fixture
async def running(state: AppState) -> AsyncIterator[AppState]:
    """A worker of every type and a relay (which publishes the released dependents)."""
    stop = Shutdown(10)
    relay = Relay(state.redis, state.keys, state.streams, state.store,
                  list(state.app.registry.types), liveness=judge(state), interval_s=0.3,
                  grace_s=1.0, ttl_s=state.settings.heartbeat_ttl, events=state.events)
    services = [asyncio.create_task(s.run(stop)) for s in (Worker(state), relay)]
    await _listening(relay)
    yield state
    stop.begin("test over")
    for task in services:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 15)


async def _listening(relay: Relay) -> None:
    for _ in range(200):
        if relay.listening:
            return
        await asyncio.sleep(0.02)
