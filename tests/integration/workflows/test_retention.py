"""The janitor prunes a workflow whole, after its last node, never a node of it before."""

from __future__ import annotations

import asyncio

import pytest

from conveyor.client import NodeRequest, TaskRequest
from conveyor.config import Settings
from conveyor.cron.janitor import Janitor
from conveyor.errors import WorkflowNotFound
from conveyor.state import AppState
from conveyor.testing.servers import PostgresServer, RedisServer
from tests.conftest import judge, make_settings
from tests.integration.workflows.test_workflows import settled


@pytest.fixture
def settings(postgres: PostgresServer, redis_server: RedisServer) -> Settings:
    return make_settings(postgres, redis_server.url, pg_pool_max=12, retention_succeeded=1.0,
                         retention_cancelled=1.0, retention_dead=1.0)


async def test_a_workflow_is_pruned_whole_after_its_last_node(running: AppState) -> None:
    janitor = Janitor(
        running.redis, running.keys, running.streams, running.store,
        list(running.app.registry.types), liveness=judge(running), settings=running.settings,
        retention={}, interval_s=0.2, batch=1000, lock_timeout_s=1.0)
    assert await janitor.lock.acquire()
    client = running.client
    created = await client.create_workflow([
        NodeRequest("a", TaskRequest("node", {"name": "a"})),
        NodeRequest("b", TaskRequest("node", {"name": "b"}, delay_s=3.0), ("a",)),
    ])
    lone = (await client.enqueue_many([TaskRequest("node", {"name": "lone"})]))[0].record
    await asyncio.sleep(2.0)  # a and the lone task finished more than the retention ago
    await janitor.tick()
    keyed = {t.workflow_key: t for t in (await client.get_workflow(created.id)).tasks}
    assert keyed["a"].status == "succeeded"
    assert keyed["b"].status in ("waiting", "queued", "running")
    assert await running.store.get(lone.id) is None  # an ordinary task goes as before
    await settled(running, created.id)
    await asyncio.sleep(1.5)
    await janitor.tick()
    assert janitor.last is not None
    assert janitor.last.workflows_pruned == 1
    with pytest.raises(WorkflowNotFound):
        await client.get_workflow(created.id)
    assert await running.store.get(keyed["a"].id) is None
