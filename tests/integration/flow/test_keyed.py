"""Per-key limits on real servers: a rate per tenant, and a tenant with ten times the backlog
of the others does not starve them."""

from __future__ import annotations

import uuid
from collections import defaultdict
from datetime import datetime

from conveyor import metrics
from conveyor.client import TaskRequest
from conveyor.state import AppState
from tests.conftest import eventually
from tests.integration.flow.conftest import StartWorker, finished


async def _times(state: AppState, ids: list[uuid.UUID], column: str
                 ) -> dict[str, list[datetime]]:
    """Per tenant, the `column` (started_at, finished_at) of its tasks, sorted."""
    rows = await state.pool.fetch(
        f"SELECT payload->>'tenant', {column} FROM {state.store.table}"
        " WHERE id = ANY($1::uuid[])", ids)
    by: dict[str, list[datetime]] = defaultdict(list)
    for tenant, at in rows:
        by[tenant].append(at)
    return {t: sorted(v) for t, v in by.items()}


def _deferred(task_type: str) -> float:
    return float(sum(metrics.FLOW_DEFERRED.labels(task_type, limit)._value.get()
                     for limit in ("key_concurrency", "key_rate")))


async def test_a_rate_per_key_paces_each_tenant_apart(
    state: AppState, start_worker: StartWorker
) -> None:
    await start_worker(types=["keyed_rate"])
    before = _deferred("keyed_rate")
    inserted = await state.client.enqueue_many(
        [TaskRequest("keyed_rate", {"tenant": t}) for _ in range(10) for t in "abc"])
    ids = [i.record.id for i in inserted]
    await eventually(lambda: finished(state, ids), 30)
    starts = await _times(state, ids, "started_at")
    for tenant, at in sorted(starts.items()):
        span = (at[-1] - at[0]).total_seconds()
        print(f"tenant {tenant}: 10 starts over {span:.2f} s (5/s: 1.8 s at the least)")
        # Cells come due every 0.2 s and a start never precedes its cell; the first start
        # may be late by what the slack allows.
        assert span >= 1.4
    put_back = _deferred("keyed_rate") - before
    print(f"put back {put_back:.0f} times for 30 tasks")


async def test_a_tenant_with_ten_times_the_backlog_does_not_starve_the_others(
    state: AppState, start_worker: StartWorker
) -> None:
    await start_worker(types=["keyed"])
    big = await state.client.enqueue_many(
        [TaskRequest("keyed", {"tenant": "big", "seconds": 0.03}) for _ in range(100)])
    small = await state.client.enqueue_many(
        [TaskRequest("keyed", {"tenant": t, "seconds": 0.03}) for _ in range(10)
         for t in ("s1", "s2")])
    ids = [i.record.id for i in [*big, *small]]
    await eventually(lambda: finished(state, ids), 60)
    done = await _times(state, ids, "finished_at")
    start = min(min(v) for v in done.values())
    big_most = (done["big"][74] - start).total_seconds()
    small_last = max((done[t][-1] - start).total_seconds() for t in ("s1", "s2"))
    print(f"small tenants done after {small_last:.2f} s; the big one 3/4 done after "
          f"{big_most:.2f} s, all after {(done['big'][-1] - start).total_seconds():.2f} s")
    # Enqueued behind the big backlog, the small tenants still finish before most of it
    # (each at 2 at once, the big one's 100 take 5 times as long as their 10 at the least).
    assert small_last < big_most
