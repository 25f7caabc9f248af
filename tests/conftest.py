"""Session servers (a real PostgreSQL and redis-server on 127.0.0.1, started here) and
per-test isolation: each test gets its own Postgres schema and Redis key prefix."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from conveyor.application import Conveyor
from conveyor.config import Settings
from conveyor.runtime.shutdown import Shutdown
from conveyor.state import AppState, open_state
from conveyor.store.workers import Liveness, confirmation_s, watch_gap_s
from conveyor.testing.redis_ha import ClusterServers
from conveyor.testing.servers import PostgresServer, RedisServer
from conveyor.worker.worker import Worker
from tests.apps import basic

# Tests log through structlog's default console renderer; its rich tracebacks (with every
# local rendered) can take minutes for one exception of a loop that fails every tick.
structlog.configure(processors=[
    *structlog.get_config()["processors"][:-1],
    structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback),
])


@pytest.fixture(scope="session")
def scratch() -> Iterator[Path]:
    # Not under pytest's tmp dir: that is private to root, and Postgres runs as `postgres`.
    path = Path(tempfile.mkdtemp(prefix="conveyor-tests-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres(scratch: Path) -> Iterator[PostgresServer]:
    server = PostgresServer(scratch / "postgres")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_server(scratch: Path) -> Iterator[RedisServer]:
    server = RedisServer(scratch / "redis")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster(scratch: Path) -> Iterator[ClusterServers]:
    """A Redis Cluster of 3 masters and 3 replicas, started once for every test that asks
    (a test that fails a node over revives it, so the next finds the cluster whole)."""
    cluster = ClusterServers(scratch / "redis-cluster")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server of the test's own, to restart, stop or wipe."""
    base = Path(tempfile.mkdtemp(prefix="conveyor-redis-"))
    server = RedisServer(base)
    server.start()
    yield server
    server.stop()
    shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def private_postgres(*, durable: bool = False) -> Iterator[PostgresServer]:
    """A PostgreSQL of the caller's own, started, then stopped and removed."""
    base = Path(tempfile.mkdtemp(prefix="conveyor-pg-"))
    base.chmod(0o755)
    server = PostgresServer(base, durable=durable)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL of the test's own, to restart or stop."""
    with private_postgres() as server:
        yield server


def judge(state: AppState) -> Liveness:
    """The liveness judge the cron service builds, for loops a test runs itself."""
    settings = state.settings
    return Liveness(state.workers, ttl_s=settings.heartbeat_ttl,
                    confirm_s=confirmation_s(settings.heartbeat_interval),
                    watch_gap_s=watch_gap_s(settings.rebalance_interval, settings.relay_interval))


def make_settings(postgres: PostgresServer, redis_url: str | None, **overrides: Any) -> Settings:
    tag = uuid.uuid4().hex[:10]
    values: dict[str, Any] = {
        "database_url": postgres.dsn,
        "redis_url": redis_url,
        "database_schema": f"t_{tag}",
        "key_prefix": f"t{tag}",
        "heartbeat_interval": 1.0,
        "heartbeat_ttl": 3.0,
        "rebalance_interval": 1.0,
        "relay_interval": 1.0,
        "relay_grace": 2.0,
        "drain_timeout": 10.0,
        "read_block": 0.2,
        "forward_interval": 0.1,
        "retry_base_delay": 0.05,
        "retry_max_delay": 0.2,
        "pg_pool_min": 1,
        "pg_pool_max": 5,
        "port": 0,
        "log_format": "json",
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def settings(postgres: PostgresServer, redis_server: RedisServer) -> Settings:
    return make_settings(postgres, redis_server.url)


@pytest.fixture
def app() -> Conveyor:
    basic.probe.reset()
    return basic.app


@pytest.fixture
async def state(settings: Settings, app: Conveyor) -> AsyncIterator[AppState]:
    async with open_state(settings, app) as opened:
        yield opened
        # bounded: a connection a failed test left in a transaction fails the teardown
        # instead of hanging it
        await opened.pool.execute(f"""BEGIN; SET LOCAL lock_timeout = '10s';
            DROP SCHEMA {settings.database_schema} CASCADE; COMMIT""")


RunningWorker = tuple[Worker, Shutdown, "asyncio.Task[None]"]


@pytest.fixture
async def start_worker(
    state: AppState,
) -> AsyncIterator[Callable[..., Awaitable[Worker]]]:
    """Factory: a Worker running in the background; stopped (drained) at teardown."""
    running: list[RunningWorker] = []

    async def start(**kwargs: Any) -> Worker:
        worker = Worker(state, **kwargs)
        shutdown = Shutdown(state.settings.drain_timeout)
        task = asyncio.create_task(worker.run(shutdown))
        running.append((worker, shutdown, task))
        return worker

    yield start
    for _, shutdown, _ in running:
        shutdown.begin("test over")
    for _, _, task in running:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 15)


async def eventually(
    check: Callable[[], Awaitable[bool]], timeout_s: float = 10.0, interval_s: float = 0.02
) -> None:
    """Poll `check` until it is true; fail after `timeout_s`."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        if await check():
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(interval_s)
