"""The pool's sessions: statements are planned for their own arguments and the table as it is
now (a generic plan made while the tasks table was small would scan it whole per batch)."""

from __future__ import annotations

from conveyor.state import AppState


async def test_every_session_plans_each_statement_afresh(state: AppState) -> None:
    async with state.pool.acquire() as conn:
        assert await conn.fetchval("SHOW plan_cache_mode") == "force_custom_plan"
        assert await conn.fetchval("SHOW application_name") == "conveyor"
