"""Workflow graphs: ordering, the refusals, the workflow's status; the NOTIFY payloads."""

from __future__ import annotations

import uuid

import pytest

from conveyor.errors import WorkflowInvalid
from conveyor.store import notify
from conveyor.store.workflows import order_nodes, workflow_status


def test_nodes_are_ordered_upstreams_first() -> None:
    keys = ["d", "b", "c", "a"]
    deps = [["b", "c"], ["a"], ["a"], []]
    order = [keys[i] for i in order_nodes(keys, deps)]
    assert order.index("a") < order.index("b") < order.index("d")
    assert order.index("c") < order.index("d")


@pytest.mark.parametrize(("keys", "deps", "rule", "says"), [
    (["a", "b", "c"], [["c"], ["a"], ["b"]], "cycle", "'a' -> 'c' -> 'b' -> 'a'"),
    (["a"], [["a"]], "cycle", "depends on itself"),
    (["a"], [["x"]], "unknown_key", "no task has key 'x'"),
    (["a", "a"], [[], []], "duplicate_key", "used twice"),
])
def test_bad_graphs_are_refused_naming_the_rule(
    keys: list[str], deps: list[list[str]], rule: str, says: str,
) -> None:
    with pytest.raises(WorkflowInvalid) as caught:
        order_nodes(keys, deps)
    assert caught.value.what == rule
    assert says in str(caught.value)


def test_a_deep_chain_is_ordered_without_recursion() -> None:
    keys = [f"n{i}" for i in range(5000)]
    deps = [[f"n{i - 1}"] if i else [] for i in range(5000)]
    assert order_nodes(keys, deps) == list(range(5000))


def test_the_workflow_status_follows_its_nodes() -> None:
    assert workflow_status(["succeeded", "waiting"], cancelled=False) == "running"
    assert workflow_status(["succeeded", "succeeded"], cancelled=False) == "succeeded"
    assert workflow_status(["succeeded", "dead"], cancelled=False) == "failed"
    assert workflow_status(["cancelled", "succeeded"], cancelled=True) == "cancelled"
    assert workflow_status(["running"], cancelled=True) == "running"


def test_the_trigger_payloads_parse() -> None:
    task_id = uuid.uuid4()
    released = notify.parse(f"a:b:{task_id}::")  # as 0007 writes them
    assert released == notify.Enqueued("a:b", task_id, None)
    cancelled = notify.parse(f"t:{task_id}:cancelled:")
    assert cancelled.cancelled
    assert notify.parse(notify.payload(cancelled)) == cancelled
