"""Redis client construction (one node, a Redis Cluster, or a master found through Sentinel)
and the translation of driver errors at the edge.

Every client is bounded the same way: callers wait, up to `_WAIT_S`, for a free connection
rather than fail, and the bound leaves room for one blocking read per task type (see
`state.py`). A cluster client keeps a pool per node that raises when it is full, so a
semaphore of the same size in front of every command and pipeline makes it wait instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import traceback
from collections.abc import AsyncIterator
from typing import Any, TypeAlias
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterPipeline, RedisCluster
from redis.asyncio.connection import BlockingConnectionPool
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialBackoff
from redis.exceptions import (
    ClusterDownError,
    ClusterError,
    MasterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from conveyor.config import Settings
from conveyor.errors import unavailable_on

Redis: TypeAlias = aioredis.Redis | RedisCluster

_WAIT_S = 10.0  # longest wait for a free connection; then the call fails as an outage

_UNAVAILABLE: tuple[type[BaseException], ...] = (
    RedisConnectionError,  # includes MasterNotFoundError: no sentinel names a master
    RedisTimeoutError,
    ConnectionError,
    OSError,
    TimeoutError,
)


# Error replies that mean "not now" rather than "wrong command": out of memory, a read-only
# replica during a failover, failing persistence (MISCONF), a busy script (BUSY), and a
# cluster in the middle of a failover or a resharding: CLUSTERDOWN, MASTERDOWN, TRYAGAIN, a
# slot no node serves yet, redirections that did not settle (the client follows MOVED and ASK
# itself), or no node reachable to learn the layout from.
_TRANSIENT_REPLIES: tuple[type[BaseException], ...] = (
    OutOfMemoryError, ReadOnlyError, TryAgainError, ClusterDownError, MasterDownError,
    ClusterError, SlotNotCoveredError,
)
_TRANSIENT_CLUSTER = ("Redis Cluster cannot be connected", "All slots are not covered",
                      "startup_nodes could not agree")


# Files in which a connection torn down under a write surfaces as a transport-internal error
# (`'NoneType' object has no attribute 'writelines'`, `... is not callable`) instead of
# ConnectionError (redis/redis-py#4287); redis-py has already disconnected it by then.
_TRANSPORT_FILES = ("redis/asyncio/connection.py", "asyncio/selector_events.py",
                    "asyncio/streams.py")


def _torn_down(exc: BaseException) -> bool:
    if not isinstance(exc, AttributeError | TypeError) or exc.__traceback__ is None:
        return False
    innermost = traceback.extract_tb(exc.__traceback__)[-1].filename
    return innermost.endswith(_TRANSPORT_FILES)


def _transient(exc: BaseException) -> bool:
    if _torn_down(exc):
        return True
    if isinstance(exc, _TRANSIENT_REPLIES):
        return True
    if isinstance(exc, RedisClusterException):  # searched: a pipeline prefixes its own text
        return any(marker in str(exc) for marker in _TRANSIENT_CLUSTER)
    return isinstance(exc, ResponseError) and str(exc).startswith(("MISCONF ", "BUSY "))


# Connection-level Redis errors, and transient error replies, become `Unavailable(op)`.
translate = unavailable_on(_UNAVAILABLE, _transient)


def open_redis(settings: Settings, *, max_connections: int) -> Redis:
    """The client `settings` ask for: a Redis Cluster (`redis_cluster`), the master the
    sentinels name (`redis_sentinels`), or one node (`redis_url`). Connections are made when
    first used. Socket reads time out after `read_block` + 10 s, longer than any blocking
    read."""
    read_timeout_s = settings.read_block + 10
    if settings.redis_sentinels:
        return _sentinel_master(settings, read_timeout_s, max_connections)
    assert settings.redis_url is not None
    if settings.redis_cluster:
        return GatedCluster.from_url(
            settings.redis_url, max_connections=max_connections,
            socket_timeout=read_timeout_s, retry=_retry(retries=3), **_SOCKET,
        )
    pool = BlockingConnectionPool.from_url(
        settings.redis_url, max_connections=max_connections, timeout=_WAIT_S,
        socket_timeout=read_timeout_s, retry=_retry(), **_SOCKET,
    )
    client: aioredis.Redis = aioredis.Redis.from_pool(pool)
    return client


_SOCKET: dict[str, Any] = {
    "decode_responses": False,
    "socket_connect_timeout": 5.0,
    "socket_keepalive": True,
    "health_check_interval": 15,
}


def _retry(retries: int = 2) -> Retry:
    """A few quick retries of a command whose connection dropped, before it raises (a
    cluster client takes only the count, and learns the layout afresh before each)."""
    return Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=retries)


# -- Redis Cluster ---------------------------------------------------------------------------

# Set while a task holds a permit: a command the cluster client issues from inside a pipeline
# (it re-sends redirected commands one by one) must not wait for a second permit.
_holding: contextvars.ContextVar[bool] = contextvars.ContextVar("conveyor_redis_permit",
                                                                default=False)


class GatedCluster(RedisCluster):
    """A RedisCluster client whose callers wait for a connection rather than fail, and which
    routes XREAD and XREADGROUP by their stream keys without asking a node.

    `max_connections` bounds the connections per node (redis-py raises MaxConnectionsError
    past it) and, here, the commands and pipelines in flight at once: each uses at most one
    connection per node, so no node's pool can run out. redis-py finds the keys of commands
    with movable keys (XREAD, XREADGROUP) by sending COMMAND GETKEYS to a node, a round trip
    per read that also fails while that node is down; they are parsed here instead.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._gate = asyncio.Semaphore(int(kwargs.get("max_connections", 100)))

    @contextlib.asynccontextmanager
    async def permit(self) -> AsyncIterator[None]:
        if _holding.get():
            yield
            return
        try:
            async with asyncio.timeout(_WAIT_S):
                await self._gate.acquire()
        except TimeoutError:
            raise RedisConnectionError("No connection available.") from None
        token = _holding.set(True)
        try:
            yield
        finally:
            _holding.reset(token)
            self._gate.release()

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        async with self.permit():
            return await super().execute_command(*args, **kwargs)

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None
                 ) -> ClusterPipeline:
        if shard_hint:
            raise RedisClusterException("shard_hint is deprecated in cluster mode")
        return _GatedPipeline(self, transaction)  # type: ignore[abstract]  # as redis-py does

    async def _determine_slot(self, command: str, *args: Any) -> int:
        if isinstance(command, (str, bytes)) and _name(command) in ("XREAD", "XREADGROUP"):
            return self._stream_slot(command, args)
        return await super()._determine_slot(command, *args)

    def _stream_slot(self, command: str | bytes, args: tuple[Any, ...]) -> int:
        """The one slot of the streams an XREAD or XREADGROUP names: the first half of the
        arguments after STREAMS (the second half are their ids)."""
        marker = next((i for i, a in enumerate(args)
                       if isinstance(a, (str, bytes)) and _name(a) == "STREAMS"), None)
        if marker is None:
            raise RedisClusterException(f"{_name(command)} without STREAMS: {args}")
        rest = args[marker + 1:]
        keys = rest[:len(rest) // 2]
        slots = {self.keyslot(k) for k in keys}
        if len(slots) != 1:
            raise RedisClusterException(
                f"{_name(command)} - all keys must map to the same key slot")
        return slots.pop()


def _name(word: str | bytes) -> str:
    return (word.decode() if isinstance(word, bytes) else word).upper()


class _GatedPipeline(ClusterPipeline):
    """A cluster pipeline that holds one of its client's permits while it executes."""

    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True
                      ) -> list[Any]:
        assert isinstance(self.cluster_client, GatedCluster)
        async with self.cluster_client.permit():
            return await super().execute(raise_on_error, allow_redirections)


# -- Sentinel --------------------------------------------------------------------------------


class _BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """Connections to whichever node the sentinels name master (asked again on every new
    connection, and after a READONLY reply), handed out as a blocking pool does."""


class SentinelMaster(aioredis.Redis):
    """A client of the master that the sentinels name; closing it closes the sentinel
    clients too."""

    sentinels: Sentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        try:
            await super().aclose(close_connection_pool)
        finally:
            if self.sentinels is not None:
                await self.sentinels.aclose()


def _sentinel_master(settings: Settings, read_timeout_s: float, max_connections: int
                     ) -> SentinelMaster:
    """The master of `redis_sentinel_master`, with the credentials, database and TLS of
    `redis_url` if given (its host and port are not used)."""
    assert settings.redis_sentinel_master is not None
    addresses = []
    for address in settings.redis_sentinels:
        host, _, port = address.rpartition(":")
        addresses.append((host.strip("[]"), int(port)))
    password = settings.redis_sentinel_password
    sentinel_kwargs: dict[str, Any] = {
        "socket_timeout": 5.0, "socket_connect_timeout": 5.0, "socket_keepalive": True,
        **({"password": password.get_secret_value()} if password else {}),
    }
    master_kwargs: dict[str, Any] = {}
    if settings.redis_url:
        url = urlsplit(settings.redis_url)
        if url.username:
            master_kwargs["username"] = unquote(url.username)
        if url.password:
            master_kwargs["password"] = unquote(url.password)
        if url.path.strip("/"):
            master_kwargs["db"] = int(url.path.strip("/"))
        if url.scheme == "rediss":
            master_kwargs["ssl"] = True
    sentinel = Sentinel(addresses, sentinel_kwargs=sentinel_kwargs)  # type: ignore[no-untyped-call]
    client = sentinel.master_for(
        settings.redis_sentinel_master, redis_class=SentinelMaster,
        connection_pool_class=_BlockingSentinelPool, max_connections=max_connections,
        timeout=_WAIT_S, socket_timeout=read_timeout_s, retry=_retry(), **_SOCKET,
        **master_kwargs,
    )
    assert isinstance(client, SentinelMaster)
    client.sentinels = sentinel
    return client
