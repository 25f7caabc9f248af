"""A run through a Redis failover, shared by the Cluster and the Sentinel tests: two workers
and the cron service's rebalance and relay work through a batch of tasks while `fail()` kills
the master under them; more tasks are enqueued during the outage. What must hold afterwards:
every task succeeded, none was lost, and none was recorded twice (a trigger notes every status
write, in the order the row locks serialised them)."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from conveyor.client import TaskRequest
from conveyor.cron.rebalance import Rebalancer
from conveyor.cron.relay import Relay
from conveyor.runtime.shutdown import Shutdown
from conveyor.runtime.supervisor import Service
from conveyor.state import AppState
from conveyor.worker.worker import Worker
from tests.apps import basic
from tests.conftest import eventually, judge

TYPE = "sleep"  # the busy type whose master is killed


async def note_transitions(state: AppState) -> None:
    """A table in the test's schema with a row per status write to a task."""
    schema = state.settings.database_schema
    await state.pool.execute(f"""
        CREATE TABLE {schema}.transitions (
          id bigserial PRIMARY KEY, task_id uuid NOT NULL, old_status text,
          new_status text NOT NULL, attempts integer NOT NULL);
        CREATE FUNCTION {schema}.note_transition() RETURNS trigger AS $$
        BEGIN
          INSERT INTO {schema}.transitions (task_id, old_status, new_status, attempts)
          VALUES (NEW.id, OLD.status, NEW.status, NEW.attempts);
          RETURN NULL;
        END $$ LANGUAGE plpgsql;
        CREATE TRIGGER note_transition AFTER UPDATE OF status ON {state.store.table}
          FOR EACH ROW EXECUTE FUNCTION {schema}.note_transition();""")


async def recorded_twice(state: AppState) -> list[str]:
    """Tasks with a status write after their first final one (succeeding twice included)."""
    schema = state.settings.database_schema
    rows = await state.pool.fetch(f"""
        WITH firsts AS (
          SELECT task_id, min(id) AS final_id FROM {schema}.transitions
          WHERE new_status IN ('succeeded', 'dead', 'cancelled') GROUP BY task_id)
        SELECT t.task_id, string_agg(coalesce(t.old_status, '') || '→' || t.new_status
                                     || '(' || t.attempts || ')', ' ' ORDER BY t.id) AS history
        FROM {schema}.transitions t JOIN firsts f USING (task_id)
        WHERE EXISTS (SELECT 1 FROM {schema}.transitions l
                      WHERE l.task_id = t.task_id AND l.id > f.final_id)
        GROUP BY t.task_id""")
    return [f"task {r['task_id']}: {r['history']}" for r in rows]


@dataclass(frozen=True)
class Outcome:
    tasks: int
    statuses: dict[str, int]
    attempts: Counter[int]  # tasks by the attempts their record shows
    runs: Counter[int]  # tasks by how many times their handler ran
    recorded_twice: list[str]
    completed_s: float  # from the kill until every task had succeeded


async def run_through_failover(
    state: AppState, fail: Callable[[], Awaitable[object]], *, before: int = 300,
    during: int = 100, seconds: float = 0.01, timeout_s: float = 90.0,
) -> Outcome:
    """Enqueue `before` tasks of `TYPE`, `fail()` once a quarter of them succeeded, enqueue
    `during` more at once (their publish may find no master: the relay publishes them later),
    and wait until every one succeeded."""
    await note_transitions(state)
    settings = state.settings
    stop = Shutdown(10)
    liveness = judge(state)
    types = list(state.app.registry.types)
    services: list[Service] = [
        Worker(state, types=[TYPE]), Worker(state, types=[TYPE, "echo"]),
        Rebalancer(state.redis, state.keys, state.streams, state.store, types,
                   liveness=liveness, interval_s=0.5, ttl_s=settings.heartbeat_ttl,
                   max_requeues=settings.max_deliveries),
        Relay(state.redis, state.keys, state.streams, state.store, types, liveness=liveness,
              interval_s=0.5, grace_s=1.0, ttl_s=settings.heartbeat_ttl),
    ]
    running = [asyncio.create_task(s.run(stop)) for s in services]
    loop = asyncio.get_running_loop()
    try:
        ids = await _enqueue(state, before, seconds)

        async def a_quarter_done() -> bool:
            return await _succeeded(state) >= before // 4

        await eventually(a_quarter_done, timeout_s=timeout_s)
        await fail()
        failed_at = loop.time()
        ids += await _enqueue(state, during, seconds)

        async def all_done() -> bool:
            return await _succeeded(state) == len(ids)

        await eventually(all_done, timeout_s=timeout_s, interval_s=0.1)
        completed_s = loop.time() - failed_at
        exited = [(s.name, t.exception()) for s, t in zip(services, running, strict=True)
                  if t.done()]
        assert not exited, f"services exited on their own: {exited}"
    finally:
        stop.begin("test over")
        await asyncio.wait_for(asyncio.gather(*running, return_exceptions=True), 30)
    rows = await state.pool.fetch(
        f"SELECT status, attempts FROM {state.store.table} WHERE id = ANY($1::uuid[])", ids)
    return Outcome(
        tasks=len(ids),
        statuses=dict(Counter(r["status"] for r in rows)),
        attempts=Counter(r["attempts"] for r in rows),
        runs=Counter(basic.probe.runs[str(i)] for i in ids),
        recorded_twice=await recorded_twice(state),
        completed_s=completed_s,
    )


async def _enqueue(state: AppState, n: int, seconds: float) -> list[uuid.UUID]:
    ids: list[uuid.UUID] = []
    for start in range(0, n, 50):
        batch = [TaskRequest(TYPE, {"seconds": seconds}) for _ in range(min(50, n - start))]
        ids += [i.record.id for i in await state.client.enqueue_many(batch)]
    return ids


async def _succeeded(state: AppState) -> int:
    count = await state.pool.fetchval(
        f"SELECT count(*) FROM {state.store.table} WHERE type = $1 AND status = 'succeeded'",
        TYPE)
    return int(count)
