"""Workflows on real servers: a worker and a relay on Postgres and Redis; the dependents are
released by the trigger in the transaction that records their last upstream."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from typing import Any

import pytest

from conveyor.client import NodeRequest, TaskRequest, insert_in_transaction
from conveyor.errors import WorkflowInvalid
from conveyor.state import AppState
from conveyor.store.workflows import WorkflowRecord
from tests.apps import flows
from tests.conftest import eventually


def node(key: str, *deps: str, fail_runs: int = 0, type_: str = "node",
         on_failure: Any = "cancel", sleep_ms: int = 0) -> NodeRequest:
    payload = {"name": key, "fail_runs": fail_runs, "sleep_ms": sleep_ms}
    return NodeRequest(key, TaskRequest(type_, payload, on_upstream_failure=on_failure), deps)


async def settled(state: AppState, workflow_id: uuid.UUID, timeout_s: float = 30
                  ) -> WorkflowRecord:
    async with asyncio.timeout(timeout_s):
        while True:
            found = await state.client.get_workflow(workflow_id)
            if found.status != "running":
                return found
            await asyncio.sleep(0.05)


def check_order(found: WorkflowRecord) -> None:
    """Every node that ran started after each of its upstreams finished."""
    by_id = {t.id: t for t in found.tasks}
    for t in found.tasks:
        for dep in t.depends_on:
            if t.started_at is not None:
                upstream = by_id[dep]
                assert upstream.finished_at is not None
                assert t.started_at >= upstream.finished_at, (t.workflow_key, dep)


async def test_a_diamond_runs_in_order_and_its_last_node_sees_both_results(
    running: AppState,
) -> None:
    created = await running.client.create_workflow(
        [node("a"), node("b", "a"), node("c", "a"), node("d", "b", "c")], name="diamond")
    keyed = {t.workflow_key: t for t in created.tasks}
    assert keyed["d"].status == "waiting"
    assert set(keyed["a"].dependents) == {keyed["b"].id, keyed["c"].id}
    found = await settled(running, created.id)
    assert found.status == "succeeded"
    assert found.name == "diamond"
    check_order(found)
    d = {t.workflow_key: t for t in found.tasks}["d"]
    assert d.result["upstream"] == {"b": ["succeeded", "b"], "c": ["succeeded", "c"]}
    assert d.depends_on == [keyed["b"].id, keyed["c"].id]
    assert flows.runs == {"a": 1, "b": 1, "c": 1, "d": 1}
    one = await running.client.get(keyed["a"].id)
    assert set(one.dependents) == {keyed["b"].id, keyed["c"].id}
    assert one.workflow_id == created.id


async def test_a_thousand_node_fan_out_fan_in_runs_its_callback_once(
    running: AppState,
) -> None:
    mids = [node(f"m{i}", "root") for i in range(998)]
    created = await running.client.create_workflow(
        [node("root"), *mids, node("sum", *(m.key for m in mids), type_="collect")])
    found = await settled(running, created.id, timeout_s=120)
    assert found.status == "succeeded"
    check_order(found)
    callback = {t.workflow_key: t for t in found.tasks}["sum"]
    assert callback.result == {"count": 998, "ok": 998}
    assert flows.runs["sum"] == 1
    assert len(flows.runs) == 1000


async def test_a_failing_node_cancels_its_dependents_and_a_retry_finishes_the_workflow(
    running: AppState,
) -> None:
    created = await running.client.create_workflow(
        [node("a"), node("b", "a", fail_runs=1), node("c", "b"), node("e", "c"),
         node("d", "a")])
    found = await settled(running, created.id)
    keyed = {t.workflow_key: t for t in found.tasks}
    assert found.status == "failed"
    assert keyed["b"].status == "dead"
    assert keyed["d"].status == "succeeded"
    assert keyed["c"].status == "cancelled"
    assert keyed["e"].status == "cancelled"
    assert keyed["c"].last_error == f"upstream task {keyed['b'].id} ended dead"
    assert keyed["e"].last_error == f"upstream task {keyed['c'].id} ended cancelled"
    retried = await running.client.retry_workflow(created.id)
    assert {t.workflow_key: t.status for t in retried.tasks}["c"] == "waiting"
    found = await settled(running, created.id)
    assert found.status == "succeeded"
    check_order(found)
    assert flows.runs == {"a": 1, "b": 2, "c": 1, "e": 1, "d": 1}


async def test_a_run_on_failure_dependent_runs_and_sees_the_failure(running: AppState) -> None:
    created = await running.client.create_workflow(
        [node("a", fail_runs=1), node("b", "a", on_failure="run")])
    found = await settled(running, created.id)
    keyed = {t.workflow_key: t for t in found.tasks}
    assert keyed["a"].status == "dead"
    assert keyed["b"].status == "succeeded"
    assert keyed["b"].on_upstream_failure == "run"
    assert keyed["b"].result["upstream"] == {"a": ["dead", None]}
    assert found.status == "failed"


async def test_a_cancelled_workflow_cancels_what_has_not_run(running: AppState) -> None:
    # "a" runs long enough that the cancel finds "c" still waiting (a fast worker could
    # otherwise finish the chain first, and "c" would rightly stay succeeded)
    created = await running.client.create_workflow(
        [node("a", sleep_ms=3000), node("b", "a"), node("c", "b")])
    await running.client.cancel_workflow(created.id)
    found = await settled(running, created.id)
    assert found.status == "cancelled"
    assert {t.status for t in found.tasks} <= {"cancelled", "succeeded"}
    assert {t.workflow_key: t.status for t in found.tasks}["c"] == "cancelled"


async def test_depends_on_existing_tasks_waits_for_them(running: AppState) -> None:
    client = running.client
    first = (await client.enqueue_many([TaskRequest("node", {"name": "x"})]))[0].record
    second = (await client.enqueue_many([TaskRequest("node", {"name": "y"},
                                                     depends_on=[first.id])]))[0].record
    assert second.depends_on == [first.id]

    async def done() -> bool:
        return (await client.get(second.id)).status == "succeeded"

    await eventually(done, 20)
    finished = await client.get(second.id)
    assert finished.result["upstream"] == {str(first.id): ["succeeded", "x"]}
    upstream_end = (await client.get(first.id)).finished_at
    assert finished.started_at is not None
    assert upstream_end is not None
    assert finished.started_at >= upstream_end
    # On one already finished: queued at once.
    third = (await client.enqueue_many([TaskRequest("node", {"name": "z"},
                                                    depends_on=[first.id])]))[0].record
    assert third.status == "queued"


async def test_a_parent_waits_for_the_children_it_enqueued(running: AppState) -> None:
    client = running.client
    parent = (await client.enqueue_many([TaskRequest("parent", {"children": 5})]))[0].record
    async with asyncio.timeout(30):
        while (record := await client.get(parent.id)).status != "succeeded":
            assert record.status in ("queued", "running"), record.last_error
            await asyncio.sleep(0.05)
    assert record.result == {"children": [f"child-{i}" for i in range(5)],
                             "statuses": ["succeeded"]}
    children = await client.flows.children(parent.id)
    assert {c.parent_id for c in children} == {parent.id}


async def test_bad_workflows_are_refused_naming_the_rule(state: AppState) -> None:
    client = state.client
    cases = [
        ([node("a", "b"), node("b", "a")], "cycle"),
        ([node("a", "nope")], "unknown_key"),
        ([node("a"), node("a")], "duplicate_key"),
        ([node(f"n{i}") for i in range(1001)], "too_many_nodes"),
        ([], "empty"),
    ]
    for nodes, rule in cases:
        with pytest.raises(WorkflowInvalid) as caught:
            await client.create_workflow(nodes)
        assert caught.value.what == rule
    with pytest.raises(WorkflowInvalid) as caught:
        await client.enqueue_many([TaskRequest("node", {"name": "q"},
                                               depends_on=[uuid.uuid4()])])
    assert caught.value.what == "unknown_task"
    assert await client.list_workflows(before=None, limit=10) == []


async def test_a_failure_at_the_head_of_a_thousand_node_chain_cancels_it_all(
    running: AppState,
) -> None:
    """The trigger resolves a chain iteratively: a failure 999 nodes deep in dependents is one
    statement's work, not 999 nested trigger calls (Postgres' stack depth)."""
    keys = [f"n{i}" for i in range(1000)]
    created = await running.client.create_workflow(
        [node(keys[0], fail_runs=1), *(node(k, p) for p, k in itertools.pairwise(keys))])
    found = await settled(running, created.id)
    keyed = {t.workflow_key: t for t in found.tasks}
    assert found.status == "failed"
    assert keyed["n0"].status == "dead"
    assert {keyed[k].status for k in keys[1:]} == {"cancelled"}
    assert keyed["n999"].last_error == f"upstream task {keyed['n998'].id} ended cancelled"
    assert all(keyed[k].finished_at is not None for k in keys[1:])
    retried = await running.client.retry_workflow(created.id)
    assert {t.status for t in retried.tasks if t.workflow_key != "n0"} == {"waiting"}
    found = await settled(running, created.id, timeout_s=240)
    assert found.status == "succeeded"
    check_order(found)
    assert flows.runs["n0"] == 2
    assert all(flows.runs[k] == 1 for k in keys[1:])


async def test_a_retry_publishes_only_the_nodes_it_queued_again(state: AppState) -> None:
    """Not a delayed node that was never touched, nor a dependent the trigger made wait."""
    client = state.client
    late = NodeRequest("late", TaskRequest("node", {"name": "late"}, delay_s=3600), ())
    created = await client.create_workflow([node("a"), node("b", "a"), late])
    keyed = {t.workflow_key: t for t in created.tasks}
    await state.pool.execute(
        f"UPDATE {state.store.table} SET status = 'dead', attempts = 1, finished_at = now()"
        " WHERE id = $1", keyed["a"].id)
    assert (await client.get(keyed["b"].id)).status == "cancelled"
    await state.redis.delete(state.keys.stream("node"))
    retried = await client.retry_workflow(created.id)
    assert {t.workflow_key: t.status for t in retried.tasks} == {
        "a": "queued", "b": "waiting", "late": "queued"}
    entries: Any = await state.redis.xrange(state.keys.stream("node"))
    published = {v for _, fields in entries for k, v in fields.items() if k in (b"id", "id")}
    assert {p.decode() if isinstance(p, bytes) else p for p in published} == {
        str(keyed["a"].id)}


async def test_a_waiter_on_a_dependent_its_upstream_cancelled_sees_why_and_when(
    running: AppState,
) -> None:
    created = await running.client.create_workflow([node("a", fail_runs=1), node("b", "a")])
    b = {t.workflow_key: t for t in created.tasks}["b"]
    a = {t.workflow_key: t for t in created.tasks}["a"]
    done = await running.client.wait(b.id, 20, known=b)
    assert done.status == "cancelled"
    assert done.last_error == f"upstream task {a.id} ended dead"
    assert done.finished_at is not None


async def test_enqueues_beside_one_another_depending_on_one_upstream_do_not_queue(
    state: AppState,
) -> None:
    """The first dependent flags its upstream (a row lock till its commit); later ones only
    share the lock, so one open transaction does not hold up another's enqueue."""
    client = state.client
    upstream = (await client.enqueue_many([TaskRequest("node", {"name": "u"})]))[0].record

    def dependent(name: str) -> TaskRequest:
        return TaskRequest("node", {"name": name}, depends_on=[upstream.id])

    async with state.pool.acquire() as first, first.transaction():
        await insert_in_transaction(client, first, dependent("d0"))
    async with state.pool.acquire() as held, held.transaction():
        await insert_in_transaction(client, held, dependent("d1"))
        async with state.pool.acquire() as other, other.transaction():
            await other.execute("SET LOCAL lock_timeout = '2s'")
            record = await insert_in_transaction(client, other, dependent("d2"))
    assert record.status == "waiting"
    assert len((await client.get(upstream.id)).dependents) == 3


async def test_a_dependent_s_idempotency_key_is_released_past_its_ttl_like_any_task_s(
    state: AppState,
) -> None:
    """One insert path: a node's key is resolved as a plain task's is (TaskStore.insert)."""
    client = state.client
    state.store.idempotency_ttl_s = 60
    upstream = (await client.enqueue_many([TaskRequest("node", {"name": "u"})]))[0].record
    request = TaskRequest("node", {"name": "d"}, idempotency_key="k", depends_on=[upstream.id])
    first = (await client.enqueue_many([request]))[0]
    again = (await client.enqueue_many([request]))[0]
    assert first.created
    assert not again.created
    assert again.record.id == first.record.id
    await state.pool.execute(
        f"UPDATE {state.store.table} SET created_at = now() - interval '1 hour' WHERE id = $1",
        first.record.id)
    later = (await client.enqueue_many([request]))[0]
    assert later.created
    assert later.record.id != first.record.id
    assert later.record.status == "waiting"
    assert later.record.depends_on == [upstream.id]


async def test_a_retried_parent_does_not_enqueue_its_children_twice(running: AppState) -> None:
    client = running.client
    parent = (await client.enqueue_many([TaskRequest("parent_retried", {"children": 3})])
              )[0].record
    async with asyncio.timeout(30):
        while (record := await client.get(parent.id)).status != "succeeded":
            assert record.status in ("queued", "running"), record.last_error
            await asyncio.sleep(0.05)
    assert record.attempts == 2
    assert record.result == {"children": ["kid-0", "kid-1", "kid-2"]}
    assert len(await client.flows.children(parent.id)) == 3
    assert all(flows.runs[f"kid-{i}"] == 1 for i in range(3))
