"""Redis client construction and the translation of driver errors at the edge."""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import (
    ClusterDownError,
    MasterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from conveyor.errors import unavailable_on

Redis = aioredis.Redis

_UNAVAILABLE: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    ConnectionError,
    OSError,
    TimeoutError,
)


# Error replies that mean "not now" rather than "wrong command": out of memory, a read-only
# replica during a failover, failing persistence (MISCONF), a busy script (BUSY).
_TRANSIENT_REPLIES: tuple[type[BaseException], ...] = (
    OutOfMemoryError, ReadOnlyError, TryAgainError, ClusterDownError, MasterDownError,
)


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, _TRANSIENT_REPLIES):
        return True
    return isinstance(exc, ResponseError) and str(exc).startswith(("MISCONF ", "BUSY "))


# Connection-level Redis errors, and transient error replies, become `Unavailable(op)`.
translate = unavailable_on(_UNAVAILABLE, _transient)


def open_redis(url: str, *, read_timeout_s: float = 10.0, max_connections: int = 64) -> Redis:
    """A client over a bounded pool (callers wait for a free connection rather than fail);
    commands retry a few times on a dropped connection before raising.

    `read_timeout_s` must exceed the longest blocking read (XREADGROUP BLOCK).
    """
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=10,
        decode_responses=False,
        socket_timeout=read_timeout_s,
        socket_connect_timeout=5.0,
        socket_keepalive=True,
        health_check_interval=15,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=2),
    )
    client: Redis = aioredis.Redis.from_pool(pool)
    return client
