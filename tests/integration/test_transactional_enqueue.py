"""`Conveyor.enqueue` inside an application's own transaction, on real Postgres: an idempotency
key reused with another payload is refused there too, as the API refuses it."""

from __future__ import annotations

import pytest

from conveyor.errors import IdempotencyConflict
from conveyor.state import AppState


async def test_a_reused_key_returns_the_first_task_or_is_refused_for_another_payload(
    state: AppState,
) -> None:
    async with state.pool.acquire() as conn, conn.transaction():
        first = await state.app.enqueue(conn, "echo", {"value": "a"}, idempotency_key="k-1")
    async with state.pool.acquire() as conn:
        async with conn.transaction():
            again = await state.app.enqueue(conn, "echo", {"value": "a"}, idempotency_key="k-1")
        assert again.id == first.id
        with pytest.raises(IdempotencyConflict, match="k-1"):
            async with conn.transaction():
                await state.app.enqueue(conn, "echo", {"value": "b"}, idempotency_key="k-1")
    record = await state.store.get(first.id)
    assert record is not None
    assert record.payload == {"value": "a"}
