"""The read linger, on real Postgres and Redis: under load a consumer waits briefly for its
slots to come free, so one read and one start statement carry a batch. Tasks started by one
statement share its transaction's `started_at`, so the number of distinct start times counts
the statements. (Without the linger the same load took ~1.9 tasks per statement: ~160
statements for 300 tasks; concurrency 10 makes 30 the fewest possible.)"""

from __future__ import annotations

import random

import pytest

from conveyor.application import Conveyor
from conveyor.client import TaskRequest
from conveyor.config import Settings
from conveyor.state import AppState
from conveyor.testing.servers import PostgresServer, RedisServer
from conveyor.worker.worker import Worker
from tests.apps import fair
from tests.conftest import eventually, make_settings
from tests.integration.worker.test_worker import StartWorker

pytestmark = pytest.mark.slow

N = 300
CONCURRENCY = 10


@pytest.fixture(params=[0.05, 0.002], ids=["long-linger", "default-linger"])
def settings(request: pytest.FixtureRequest, postgres: PostgresServer,
             redis_server: RedisServer) -> Settings:
    return make_settings(postgres, redis_server.url, concurrency=CONCURRENCY,
                         read_linger=request.param)


@pytest.fixture
def app() -> Conveyor:
    fair.runs.clear()
    return fair.app


async def _start_statements(state: AppState, start_worker: StartWorker) -> int:
    """Run N handlers of 1 to 3 ms (each ends on its own, so slots come free one at a time) and
    count the start statements that started them."""
    rng = random.Random(5)
    inserted = await state.client.enqueue_many(
        [TaskRequest("busy", {"seconds": rng.uniform(0.001, 0.003)}) for _ in range(N)])
    assert len(inserted) == N
    worker: Worker = await start_worker(types=["busy"])
    assert worker.slots.capacity == CONCURRENCY

    table = f"{state.settings.database_schema}.tasks"

    async def done() -> bool:
        return bool(await state.pool.fetchval(
            f"SELECT count(*) = $1 FROM {table} WHERE status = 'succeeded'", N))

    await eventually(done, timeout_s=60, interval_s=0.2)
    statements: int = await state.pool.fetchval(
        f"SELECT count(DISTINCT started_at) FROM {table}")
    return statements


async def test_under_load_a_read_waits_for_its_slots_and_starts_a_batch(
    state: AppState, start_worker: StartWorker
) -> None:
    linger = state.settings.read_linger
    statements = await _start_statements(state, start_worker)
    print(f"\nread linger {linger * 1000:.0f} ms: {N} tasks started by {statements} "
          f"statements ({N / statements:.1f} per statement)")
    # A 50 ms linger gathers every slot: about N / CONCURRENCY statements. The default's 2 ms,
    # for handlers of up to 3 ms, gathers part of them (~60 statements here; without the
    # linger ~160): a loose bound, since a slow machine's timings move it either way.
    assert statements <= (N / 5 if linger > 0.01 else N / 3)
