"""A pinned connection's session: its statements run on each connection it takes, and the
pool's reset undoes them when the connection goes back (the worker's lookups price out
sequential scans, which a generic plan made while the tasks table was small would keep)."""

from __future__ import annotations

from conveyor.state import AppState
from conveyor.store.pool import Pinned
from conveyor.store.tasks import LOOKUP_SESSION


async def test_a_pinned_session_holds_until_the_connection_goes_back(state: AppState) -> None:
    pinned = Pinned(state.pool, session=LOOKUP_SESSION)
    try:
        async with pinned.connection("test") as conn:
            pid = await conn.fetchval("SELECT pg_backend_pid()")
            assert await conn.fetchval("SHOW enable_seqscan") == "off"
        async with pinned.connection("test") as conn:  # the same connection, still set
            assert await conn.fetchval("SELECT pg_backend_pid()") == pid
            assert await conn.fetchval("SHOW enable_seqscan") == "off"
    finally:
        await pinned.release()
    async with state.pool.acquire() as conn:
        assert await conn.fetchval("SHOW enable_seqscan") == "on"
