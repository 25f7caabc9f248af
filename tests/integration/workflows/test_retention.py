"""The janitor prunes a workflow whole, after its last node, never a node of it before."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from conveyor.client import NodeRequest, TaskRequest
from conveyor.config import Settings
from conveyor.cron.janitor import Janitor
from conveyor.errors import WorkflowNotFound
from conveyor.registry import Retention
from conveyor.state import AppState
from conveyor.testing.servers import PostgresServer, RedisServer
from tests.conftest import eventually, judge, make_settings


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
        NodeRequest("b", TaskRequest("node", {"name": "b"}, delay_s=3600), ("a",)),
    ])
    keyed = {t.workflow_key: t for t in created.tasks}
    lone = (await client.enqueue_many([TaskRequest("node", {"name": "lone"})]))[0].record

    async def finished() -> bool:
        statuses = [(await client.get(i)).status for i in (keyed["a"].id, lone.id)]
        return statuses == ["succeeded", "succeeded"]

    await eventually(finished, 20)
    table = running.store.table

    async def age(*ids: uuid.UUID) -> None:
        """As if these nodes had finished (and the workflow been made) an hour ago: b, due in
        an hour, stays unfinished however slow the machine."""
        await running.pool.execute(
            f"UPDATE {table} SET finished_at = now() - interval '1 hour',"
            " created_at = now() - interval '1 hour' WHERE id = ANY($1::uuid[])", list(ids))
        await running.pool.execute(
            f"UPDATE {running.client.flows.workflows} SET created_at = now() - interval '1 hour'"
            " WHERE id = $1", created.id)

    await age(keyed["a"].id)
    await asyncio.sleep(1.5)  # the lone task finished more than its retention (1 s) ago
    await janitor.tick()
    now = {t.workflow_key: t for t in (await client.get_workflow(created.id)).tasks}
    assert now["a"].status == "succeeded"  # b (due in an hour) is unfinished: a is kept
    assert now["b"].status in ("waiting", "queued")
    assert await running.store.get(lone.id) is None  # an ordinary task goes as before
    await client.cancel_workflow(created.id)
    await age(keyed["b"].id)
    await janitor.tick()
    assert janitor.last is not None
    assert janitor.last.workflows_pruned == 1
    with pytest.raises(WorkflowNotFound):
        await client.get_workflow(created.id)
    assert await running.store.get(keyed["a"].id) is None


async def test_a_type_s_own_retention_keeps_its_workflows_as_long(state: AppState) -> None:
    def janitor(retention: dict[str, Retention]) -> Janitor:
        return Janitor(state.redis, state.keys, state.streams, state.store,
                       list(state.app.registry.types), liveness=judge(state),
                       settings=state.settings, retention=retention, interval_s=1.0,
                       batch=1000, lock_timeout_s=1.0)

    assert janitor({}).workflows_kept_s() == 1.0
    assert janitor({"node": Retention(succeeded=7200)}).workflows_kept_s() == 7200
    assert janitor({"node": Retention(dead=0)}).workflows_kept_s() == 0
