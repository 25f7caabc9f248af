"""The asyncpg pool: open with retries, close, and translate driver errors at the edge."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any, TypeAlias

import asyncpg
import orjson
import structlog
from asyncpg.pool import PoolConnectionProxy

from conveyor.errors import Conflict, Failover, Overloaded, Unavailable

log = structlog.get_logger("conveyor.store")

Pool: TypeAlias = "asyncpg.Pool[asyncpg.Record]"
# A plain connection or one borrowed from a pool: both run queries and transactions.
Connection: TypeAlias = "asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]"

# Errors that mean "the server is not reachable right now", as opposed to a bad query.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    # A connection the server dropped mid-operation can surface as a protocol-state error; the
    # pool's reset on release then fails and the connection is replaced.
    asyncpg.exceptions.InternalClientError,
    OSError,
    TimeoutError,
)
# SQLSTATEs of a statement that lost a race: serialization_failure, deadlock_detected,
# lock_not_available (lock_timeout), query_canceled (statement_timeout, a cancel request).
_CONFLICT = frozenset({"40001", "40P01", "55P03", "57014"})
# SQLSTATEs of a server that will not take writes on this connection: read_only_sql_transaction
# (a primary demoted under a pooled connection), admin_shutdown, crash_shutdown,
# cannot_connect_now ("the database system is in recovery", "... is starting up").
_FAILOVER = frozenset({"25006", "57P01", "57P02", "57P03"})


def classify(exc: BaseException) -> type[Unavailable] | None:
    """The one classification of driver errors, for every loop: `Failover` (drop the
    connection, retry), `Conflict` (retry the statement), `Unavailable` (an outage: wait and
    retry), or None: permanent, a statement Postgres refuses (a value it cannot store, a
    constraint, a trigger's error), which callers settle with the reason instead of retrying."""
    if isinstance(exc, Unavailable):
        return type(exc)
    sqlstate = getattr(exc, "sqlstate", None) if isinstance(exc, asyncpg.PostgresError) else None
    if sqlstate in _FAILOVER:
        return Failover
    if sqlstate in _CONFLICT:
        return Conflict
    if isinstance(exc, asyncpg.InterfaceError):
        # The client's own errors: about the connection ("connection is closed", "... has
        # been released back to the pool") they are an outage; anything else (an argument
        # it cannot encode, a wrong number of them, an unsupported feature) is permanent.
        return Unavailable if _about_the_connection(exc) else None
    if isinstance(exc, _UNAVAILABLE):
        return Unavailable
    return None


def _about_the_connection(exc: asyncpg.InterfaceError) -> bool:
    if type(exc) is not asyncpg.InterfaceError:  # ClientConfigurationError, DataError, ...
        return False
    text = str(exc)
    return "connection" in text or "another operation is in progress" in text


@contextlib.contextmanager
def translate(op: str) -> Iterator[None]:
    """Re-raise driver errors as the `Unavailable` subclass `classify` names, with `op`;
    permanent errors pass through unchanged."""
    try:
        yield
    except Unavailable:
        raise
    except Exception as exc:
        kind = classify(exc)
        if kind is None:
            raise
        raise kind(op, f"{type(exc).__name__}: {exc}") from exc


async def _drop_if_failover(pool: Pool, exc: BaseException) -> None:
    """After a failover every pooled connection may point at the old primary: expire them all,
    so each is closed on release (or next acquire) and replaced by a fresh one."""
    if classify(exc) is Failover:
        log.warning("store.failover", error=f"{type(exc).__name__}: {exc}")
        await pool.expire_connections()


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


async def _init_connection(conn: asyncpg.Connection[asyncpg.Record]) -> None:
    await conn.set_type_codec("jsonb", encoder=_dumps, decoder=orjson.loads, schema="pg_catalog")
    await conn.set_type_codec("json", encoder=_dumps, decoder=orjson.loads, schema="pg_catalog")


# Prepared statements are made again this often. Postgres keeps a generic plan for a
# statement prepared on its connection, priced against the table as it was then: one made
# while the tasks table was small (a new deployment, or one kept small by retention) scans the
# whole table per statement after it has grown, until it is prepared again. Re-preparing costs
# a parse and a few custom plans per statement and connection every few seconds. (The worker's
# start and outcome statements, its busiest, have plan settings of their own that keep index
# lookups of the given ids: `tasks.WORKER_PLANS`.)
STATEMENT_LIFETIME_S = 2


async def open_pool(
    dsn: str, *, min_size: int = 2, max_size: int = 10, connect_timeout_s: float = 30.0
) -> Pool:
    """Open a pool, retrying with backoff until `connect_timeout_s` passes."""
    deadline = time.monotonic() + connect_timeout_s
    delay = 0.1
    while True:
        try:
            with translate("pool.open"):
                pool: Pool = await asyncpg.create_pool(
                    dsn,
                    min_size=min_size,
                    max_size=max_size,
                    init=_init_connection,
                    command_timeout=60,
                    max_cached_statement_lifetime=STATEMENT_LIFETIME_S,
                    server_settings={"application_name": "conveyor"},
                )
            return pool
        except Unavailable as exc:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("store.connect.retrying", error=exc.detail, retry_in_s=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


async def close_pool(pool: Pool, timeout_s: float = 10.0) -> None:
    """Close gracefully, waiting up to `timeout_s` for borrowed connections to come back, then
    terminate the rest: a caller stuck on a connection (a lock wait, a server gone silent)
    must not keep the process from exiting."""
    try:
        await asyncio.wait_for(pool.close(), timeout_s)
    except TimeoutError:
        log.warning("store.close.terminated", waited_s=timeout_s)
        pool.terminate()


async def acquire(pool: Pool, timeout_s: float, op: str) -> PoolConnectionProxy[asyncpg.Record]:
    """A pooled connection; Overloaded if none frees up within `timeout_s` (Postgres cannot keep
    up: callers get 503 + Retry-After instead of queueing without bound)."""
    try:
        return await pool.acquire(timeout=timeout_s)
    except TimeoutError:
        raise Overloaded(f"{op}: no Postgres connection free within {timeout_s} s") from None


@contextlib.asynccontextmanager
async def borrowed(pool: Pool, timeout_s: float, op: str) -> AsyncIterator[Connection]:
    """A pooled connection for one operation, errors translated; returned to the pool after,
    closed instead if it reported a failover."""
    with translate(op):
        conn = await acquire(pool, timeout_s, op)
        try:
            yield conn
        except BaseException as exc:
            await _drop_if_failover(pool, exc)
            raise
        finally:
            await pool.release(conn)


class Pinned:
    """One pooled connection kept by a single owner across many statements, sparing the
    acquire, release and session reset of each (two round trips fewer per statement).

    For one coroutine at a time (asyncpg runs one statement per connection). After a failed
    statement the connection goes back to the pool, whose reset replaces it if it is broken,
    and the next use takes a fresh one; after a failover it is closed, and the next use
    reconnects. `session`: settings (`SET ...`) made on each connection it takes, undone by
    the pool's reset (`RESET ALL`) when the connection goes back.
    """

    def __init__(self, pool: Pool, *, acquire_timeout_s: float = 5.0,
                 session: str | None = None) -> None:
        self.pool = pool
        self.acquire_timeout_s = acquire_timeout_s
        self.session = session
        self._conn: PoolConnectionProxy[asyncpg.Record] | None = None

    @contextlib.asynccontextmanager
    async def connection(self, op: str) -> AsyncIterator[Connection]:
        with translate(op):
            if self._conn is None or not _usable(self._conn):
                self._conn = await self._take(op)
            try:
                yield self._conn
            except BaseException as exc:
                await _drop_if_failover(self.pool, exc)
                await self.release()
                raise

    async def _take(self, op: str) -> PoolConnectionProxy[asyncpg.Record]:
        conn = await acquire(self.pool, self.acquire_timeout_s, op)
        if self.session is not None:
            try:
                await conn.execute(self.session)
            except BaseException as exc:
                await _drop_if_failover(self.pool, exc)
                with contextlib.suppress(Exception):  # the error to report is the SET's
                    await self.pool.release(conn)
                raise
        return conn

    async def release(self, timeout_s: float = 5.0) -> None:
        """Give the connection back (its reset bounded by `timeout_s`, then it is dropped)."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            async with asyncio.timeout(timeout_s):
                await self.pool.release(conn)
        except Exception:
            with contextlib.suppress(Exception):
                conn.terminate()


def _usable(conn: PoolConnectionProxy[asyncpg.Record]) -> bool:
    # A connection the server closed is taken back by the pool, detaching this proxy.
    try:
        return not conn.is_closed()
    except asyncpg.InterfaceError:
        return False
