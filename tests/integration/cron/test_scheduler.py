"""Cron jobs fire once per slot, however many schedulers run."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from conveyor.cron.scheduler import CronScheduler, slot_key
from conveyor.runtime.shutdown import Shutdown
from conveyor.state import AppState
from conveyor.worker.worker import Worker
from tests.apps import basic
from tests.conftest import eventually


def scheduler(state: AppState, clock: Callable[[], float] | None = None) -> CronScheduler:
    jobs = list(state.app.registry.cron_jobs.values())
    if clock is None:
        return CronScheduler(state.client, jobs)
    return CronScheduler(state.client, jobs, clock=clock)


async def slots(state: AppState) -> list[str]:
    rows = await state.pool.fetch(
        f"SELECT idempotency_key FROM {state.store.table} WHERE type = 'every_second'"
        " ORDER BY idempotency_key"
    )
    return [r[0] for r in rows]


async def test_two_schedulers_fire_a_slot_once(state: AppState) -> None:
    now = [datetime(2026, 1, 1, 12, 0, 0, 500_000, tzinfo=UTC).timestamp()]
    first, second = scheduler(state, lambda: now[0]), scheduler(state, lambda: now[0])
    assert await first.tick() == 0  # nothing due yet: the next slot is 12:00:01
    assert await second.tick() == 0
    now[0] += 1.0  # 12:00:01.5
    assert await first.tick() == 1
    assert await second.tick() == 0
    now[0] += 3.0  # 12:00:04.5: slots 2 and 3 passed while "down": one late fire
    assert await second.tick() == 1
    assert await first.tick() == 0
    assert await slots(state) == [
        slot_key(datetime(2026, 1, 1, 12, 0, 1, tzinfo=UTC)),
        slot_key(datetime(2026, 1, 1, 12, 0, 2, tzinfo=UTC)),
    ]


async def test_running_schedulers_and_a_worker_run_each_slot_once(
    state: AppState, start_worker: Callable[..., Awaitable[Worker]]
) -> None:
    await start_worker(types=["every_second"])
    stop = Shutdown()
    running = [asyncio.create_task(scheduler(state).run(stop)) for _ in range(3)]
    await eventually(lambda: _fired(3), timeout_s=10)
    stop.begin()
    await asyncio.gather(*running)
    fired = await slots(state)
    assert len(fired) == len(set(fired)) >= 3
    cron_runs = {k: v for k, v in basic.probe.runs.items() if k.startswith("cron:")}
    assert all(n == 1 for n in cron_runs.values())


async def _fired(n: int) -> bool:
    return sum(1 for k in basic.probe.runs if k.startswith("cron:")) >= n
