"""Keyed put-backs (a started task whose concurrency key is at its limit goes back to queued):
when Postgres refuses the put-back the task runs rather than staying `running` with no
handler, and a task whose cancel was asked meanwhile ends cancelled and is announced. Faults
are real server errors, raised by a trigger on the tasks table."""

from __future__ import annotations

import uuid

from conveyor.client import TaskRequest
from conveyor.state import AppState
from tests.conftest import eventually
from tests.integration.flow.conftest import StartWorker


async def _statuses(state: AppState, ids: list[uuid.UUID]) -> dict[str, int]:
    rows = await state.pool.fetch(
        f"SELECT status, count(*) FROM {state.store.table} WHERE id = ANY($1::uuid[])"
        " GROUP BY status", ids)
    return {r[0]: r[1] for r in rows}


async def _trigger(state: AppState, name: str, body: str) -> None:
    schema = state.settings.database_schema
    await state.pool.execute(f"""
        CREATE OR REPLACE FUNCTION {schema}.{name}() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN {body} RETURN NEW; END $$;
        CREATE TRIGGER {name} BEFORE UPDATE ON {state.store.table}
            FOR EACH ROW EXECUTE FUNCTION {schema}.{name}();""")


async def _drop(state: AppState, name: str) -> None:
    await state.pool.execute(f"DROP TRIGGER {name} ON {state.store.table}")


async def test_a_put_back_postgres_refuses_runs_the_task_instead(
    state: AppState, start_worker: StartWorker
) -> None:
    # Every put-back (running → queued, the attempt given back, due later) fails as an
    # outage would (a serialization failure, retried and then given up).
    await _trigger(state, "refuse_defer", """
        IF OLD.status = 'running' AND NEW.attempts = OLD.attempts - 1
           AND NEW.run_at > now() THEN
          RAISE EXCEPTION 'put-back refused' USING ERRCODE = '40001';
        END IF;""")
    try:
        await start_worker(types=["keyed"])
        inserted = await state.client.enqueue_many(
            [TaskRequest("keyed", {"tenant": "t1", "seconds": 0.2}) for _ in range(6)])
        ids = [i.record.id for i in inserted]

        async def all_succeeded() -> bool:
            return (await _statuses(state, ids)).get("succeeded", 0) == len(ids)

        await eventually(all_succeeded, 20)  # none is left running without a handler
    finally:
        await _drop(state, "refuse_defer")


async def test_a_put_back_whose_cancel_was_asked_ends_cancelled_and_is_announced(
    state: AppState, start_worker: StartWorker
) -> None:
    # The task labelled `cancel-me` is asked to stop as it starts (the trigger stands for a
    # cancel arriving between its start and its put-back).
    await _trigger(state, "ask_cancel", """
        IF OLD.status = 'queued' AND NEW.status = 'running'
           AND NEW.payload->>'label' = 'cancel-me' THEN
          NEW.cancel_requested := true;
        END IF;""")
    try:
        await start_worker(types=["keyed"])
        busy = await state.client.enqueue_many(
            [TaskRequest("keyed", {"tenant": "t1", "seconds": 1.5}) for _ in range(2)])

        async def both_running() -> bool:
            return (await _statuses(state, [i.record.id for i in busy])).get("running") == 2

        await eventually(both_running, 10)  # the tenant is at its limit of 2
        task = (await state.client.enqueue("keyed", {"tenant": "t1",
                                                     "label": "cancel-me"})).record

        async def cancelled() -> bool:
            return (await _statuses(state, [task.id])).get("cancelled") == 1

        await eventually(cancelled, 10)

        async def announced() -> bool:
            events = await state.events.read("0", 100, 10_000)
            return any(e.kind == "cancelled" and e.task_id == str(task.id) for e in events)

        await eventually(announced, 5)
    finally:
        await _drop(state, "ask_cancel")
