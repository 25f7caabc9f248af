"""AppState: the one object holding settings, the Postgres pool, the Redis client and the task
registry, built once per process and shared by every service.  [app state]"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import structlog

from conveyor import tracing
from conveyor.application import Conveyor
from conveyor.client import Client
from conveyor.config import Settings
from conveyor.egress.policy import EgressPolicy, installed
from conveyor.errors import ConfigError
from conveyor.queue.connection import Redis, open_redis, translate
from conveyor.queue.events import EventLog
from conveyor.queue.keys import Keys
from conveyor.queue.streams import TaskStreams
from conveyor.store.migrate import migrate
from conveyor.store.pool import Pinned, Pool, close_pool, open_pool
from conveyor.store.tasks import TaskStore
from conveyor.store.workers import WorkerStore

log = structlog.get_logger("conveyor.state")


@dataclass(frozen=True)
class AppState:
    settings: Settings
    app: Conveyor
    pool: Pool
    redis: Redis
    keys: Keys
    store: TaskStore
    streams: TaskStreams
    client: Client
    workers: WorkerStore
    events: EventLog


@contextlib.asynccontextmanager
async def open_state(
    settings: Settings, app: Conveyor, *, apply_migrations: bool = True
) -> AsyncIterator[AppState]:
    """Connect to Postgres and Redis (migrating first), yield the state, close both at exit.
    With `settings.tracing`, tracing is on meanwhile (see `conveyor.tracing`)."""
    with tracing.enabled_by(settings.tracing):
        async with _open_state(settings, app, apply_migrations=apply_migrations) as state:
            yield state


@contextlib.asynccontextmanager
async def _open_state(
    settings: Settings, app: Conveyor, *, apply_migrations: bool
) -> AsyncIterator[AppState]:
    if not settings.database_url or not settings.redis_given:
        raise ConfigError("DATABASE_URL and REDIS_URL must both be set (or neither, for `run`)")
    pool = await open_pool(
        settings.database_url, min_size=settings.pg_pool_min, max_size=settings.pg_pool_max
    )
    pinned = Pinned(pool, acquire_timeout_s=settings.pg_acquire_timeout)  # the client's
    # Room for a blocking read per type (XREADGROUP, or an idle type's XREAD), and as many
    # settles, plus the rest of the process's calls.
    redis = open_redis(
        settings, max_connections=max(32, 2 * len(app.registry) + settings.concurrency + 16),
    )
    try:
        if apply_migrations:
            await migrate(pool, settings.database_schema,
                          lock_timeout_s=settings.migrate_lock_timeout)
        with translate("redis.ping"):
            await redis.ping()
        keys = Keys(settings.key_prefix)
        store = TaskStore(pool, settings.database_schema,
                          acquire_timeout_s=settings.pg_acquire_timeout,
                          idempotency_ttl_s=settings.idempotency_ttl)
        streams = TaskStreams(redis, keys, dead_letter_maxlen=settings.dead_letter_maxlen)
        events = EventLog(redis, keys, maxlen=settings.events_maxlen)
        client = Client(store, streams, app.registry, default_max_attempts=settings.max_attempts,
                        pinned=pinned, events=events)
        workers = WorkerStore(pool, settings.database_schema,
                              acquire_timeout_s=settings.pg_acquire_timeout)
        app.bind(client)
        try:
            # Payload validation (webhook URLs) checks against this state's allowed ranges.
            with installed(EgressPolicy.from_settings(settings)):
                yield AppState(settings, app, pool, redis, keys, store, streams, client,
                               workers, events)
        finally:
            app.unbind(client)
            await client.close()
    finally:
        await pinned.release()
        await redis.aclose()
        await close_pool(pool)
