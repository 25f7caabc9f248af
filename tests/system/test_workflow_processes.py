"""A 500-node workflow through two `conveyor worker` processes and a `conveyor cron` while one
worker is SIGKILLed and Redis is flushed: every node succeeds, the callback sees every middle
node, and no node started before each of its upstreams had finished."""

from __future__ import annotations

import signal

import pytest

from conveyor.application import Conveyor
from conveyor.client import NodeRequest, TaskRequest
from conveyor.config import Settings
from conveyor.state import AppState
from conveyor.testing.servers import PostgresServer, RedisServer
from tests.apps import flows
from tests.conftest import eventually, make_settings
from tests.system.conftest import Spawner

pytestmark = pytest.mark.slow
APP = ["--app", "tests.apps.flows:app"]


@pytest.fixture
def app() -> Conveyor:
    return flows.app


@pytest.fixture
def settings(postgres: PostgresServer, own_redis: RedisServer) -> Settings:
    return make_settings(postgres, own_redis.url)


async def test_a_worker_kill_and_a_flushall_mid_workflow_lose_and_hasten_nothing(
    state: AppState, spawn: Spawner,
) -> None:
    workers = [spawn("worker", *APP, "--concurrency", "10") for _ in range(2)]
    spawn("cron", *APP)
    # Attempts to spare: the killed worker's attempts count (`worker_lost`).
    mids = [NodeRequest(f"m{i}", TaskRequest("node", {"name": f"m{i}", "sleep_ms": 50},
                                             max_attempts=5), ("root",)) for i in range(498)]
    created = await state.client.create_workflow([
        NodeRequest("root", TaskRequest("node", {"name": "root"}, max_attempts=5)), *mids,
        NodeRequest("sum", TaskRequest("collect", {"name": "sum"}, max_attempts=5),
                    tuple(m.key for m in mids)),
    ])
    table = state.store.table

    async def succeeded_at_least(n: int) -> bool:
        found: int = await state.pool.fetchval(
            f"SELECT count(*) FROM {table} WHERE workflow_id = $1 AND status = 'succeeded'",
            created.id)
        return found >= n

    await eventually(lambda: succeeded_at_least(60), timeout_s=60)
    workers[0].signal(signal.SIGKILL)
    await state.redis.flushall()

    async def over() -> bool:
        return (await state.client.get_workflow(created.id)).status != "running"

    await eventually(over, timeout_s=120)
    found = await state.client.get_workflow(created.id)
    assert found.status == "succeeded", [(t.workflow_key, t.status, t.last_error)
                                         for t in found.tasks if t.status != "succeeded"][:5]
    by_id = {t.id: t for t in found.tasks}
    for task in found.tasks:
        assert task.started_at is not None
        # Every attempt, not only the last: one begun before an upstream finished (by a
        # worker killed since) would be a dependent released early.
        starts = [a["started_at"] for a in task.attempt_history]
        assert task.started_at in starts
        assert all(s is not None for s in starts), task.attempt_history
        for dep in task.depends_on:
            upstream = by_id[dep].finished_at
            assert upstream is not None
            for started in starts:
                assert started >= upstream, (task.workflow_key, by_id[dep].workflow_key)
    callback = {t.workflow_key: t for t in found.tasks}["sum"]
    assert callback.result == {"count": 498, "ok": 498}
    assert callback.attempts == 1
