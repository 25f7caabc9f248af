"""unique_for on real Postgres: the window ends (a finished holder no longer dedups once it is
over), and transactions on separate connections still make one task."""

from __future__ import annotations

import asyncio

from conveyor.client import TaskRequest, insert_in_transaction
from conveyor.state import AppState


async def test_after_the_window_a_finished_holder_no_longer_dedups(state: AppState) -> None:
    first = (await state.client.enqueue("plain", {"label": "w"}, unique_for=0.5)).record
    await state.client.cancel(first.id)  # finished: only the window holds it now
    within = await state.client.enqueue("plain", {"label": "w"}, unique_for=0.5)
    assert within.record.id == first.id
    assert not within.created
    await asyncio.sleep(0.7)
    after = await state.client.enqueue("plain", {"label": "w"}, unique_for=0.5)
    assert after.created
    assert after.record.id != first.id
    # While queued, the holder dedups whatever the window (here past, as for `after` now).
    await asyncio.sleep(0.7)
    again = await state.client.enqueue("plain", {"label": "w"}, unique_for=0.5)
    assert again.record.id == after.record.id


async def test_transactions_on_separate_connections_make_one_task(state: AppState) -> None:
    request = TaskRequest("plain", {"label": "tx"}, unique_for=60)
    go = asyncio.Event()

    async def one() -> object:
        async with state.pool.acquire() as conn, conn.transaction():
            await go.wait()
            record = await insert_in_transaction(state.client, conn, request)
            await asyncio.sleep(0.05)  # hold the transaction open while the others insert
            return record.id

    tasks = [asyncio.create_task(one()) for _ in range(8)]
    await asyncio.sleep(0.1)
    go.set()
    ids = await asyncio.gather(*tasks)
    assert len(set(ids)) == 1
    rows = await state.pool.fetchval(
        f"SELECT count(*) FROM {state.store.table} WHERE unique_key IS NOT NULL"
        " AND payload->>'label' = 'tx'")
    assert rows == 1
