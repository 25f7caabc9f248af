"""Pinned connections on a real PostgreSQL: a pinned session's settings hold on every
connection it takes and leave with the connection."""

from __future__ import annotations

from conveyor.store.pool import Pinned, open_pool
from conveyor.testing.servers import PostgresServer

SESSION = "SET work_mem = '7MB'"


async def test_a_pinned_session_is_made_on_each_connection_taken_and_reset_on_return(
    postgres: PostgresServer,
) -> None:
    pool = await open_pool(postgres.dsn, min_size=1, max_size=1)  # one connection, reused
    try:
        pinned = Pinned(pool, session=SESSION)
        async with pinned.connection("test") as conn:
            assert await conn.fetchval("SHOW work_mem") == "7MB"
        await pinned.release()  # as after a failed statement
        async with pool.acquire() as conn:  # the pool's reset undid the session
            assert await conn.fetchval("SHOW work_mem") == "4MB"
        async with pinned.connection("test") as conn:  # taken again: made again
            assert await conn.fetchval("SHOW work_mem") == "7MB"
        await pinned.release()
        plain = Pinned(pool)
        async with plain.connection("test") as conn:
            assert await conn.fetchval("SHOW work_mem") == "4MB"
        await plain.release()
    finally:
        await pool.close()
