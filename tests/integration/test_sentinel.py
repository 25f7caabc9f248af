"""Redis through Sentinel (a master, a replica, three sentinels on loopback): Conveyor finds
the master by asking the sentinels, and follows a failover mid-run (SIGKILL of the master; the
sentinels promote the replica): every task completes, none lost, none recorded twice."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from conveyor.config import Settings
from conveyor.state import AppState
from conveyor.testing.redis_ha import SentinelServers
from conveyor.testing.servers import PostgresServer
from tests.conftest import make_settings
from tests.integration.failover import run_through_failover

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sentinels() -> Iterator[SentinelServers]:
    base = Path(tempfile.mkdtemp(prefix="conveyor-sentinel-"))
    servers = SentinelServers(base)
    try:
        servers.start()
        yield servers
    finally:
        servers.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def settings(postgres: PostgresServer, sentinels: SentinelServers) -> Settings:
    return make_settings(postgres, None, redis_sentinels=sentinels.addresses,
                         redis_sentinel_master=sentinels.master_name, pg_pool_max=12)


async def test_the_master_is_the_one_the_sentinels_name(
    state: AppState, sentinels: SentinelServers
) -> None:
    info = await state.redis.info("server")
    assert info["tcp_port"] == sentinels.master_port()
    assert (await state.redis.info("replication"))["role"] == "master"


async def test_a_failover_mid_run_loses_nothing(
    state: AppState, sentinels: SentinelServers
) -> None:
    old = sentinels.current_master()

    async def kill_the_master() -> None:
        await asyncio.to_thread(old.stop, kill=True)

    outcome = await run_through_failover(state, kill_the_master)
    new_port = sentinels.master_port()
    assert new_port != old.port
    assert (await state.redis.info("server"))["tcp_port"] == new_port
    print(f"sentinel failover: {outcome}")
    assert outcome.statuses == {"succeeded": outcome.tasks}
    assert outcome.recorded_twice == []
    assert outcome.attempts == {1: outcome.tasks}
    assert outcome.runs == {1: outcome.tasks}
