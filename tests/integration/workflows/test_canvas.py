"""app.chain / app.group / `>>` build one workflow; its callback gets the group's results."""

from __future__ import annotations

import itertools

from conveyor.state import AppState
from tests.apps import flows
from tests.apps.flows import Node, collect, node
from tests.integration.workflows.test_workflows import settled


async def test_a_chord_after_a_chain_runs_in_order(running: AppState) -> None:
    app = flows.app
    flow = app.chain(
        node.s(Node(name="first"), key="first"),
        app.group(*(node.s(Node(name=f"g{i}")) for i in range(3))),
    ) >> collect.s(Node(name="report"), key="report")
    keys = [n.key for n in flow.nodes()]
    assert keys[0] == "first"
    assert keys[-1] == "report"
    created = await flow.enqueue(name="chord")
    found = await settled(running, created.id)
    assert found.status == "succeeded"
    keyed = {t.workflow_key: t for t in found.tasks}
    assert keyed["report"].result == {"count": 3, "ok": 3}
    assert len(keyed["report"].depends_on) == 3
    group = [t for t in found.tasks if t.workflow_key not in ("first", "report")]
    assert all(t.depends_on == [keyed["first"].id] for t in group)
    assert flows.runs == {"first": 1, "g0": 1, "g1": 1, "g2": 1, "report": 1}


async def test_a_thousand_step_chain_whose_first_step_fails_is_cancelled_whole(
    running: AppState,
) -> None:
    app = flows.app
    flow = app.chain(node.s(Node(name="s0", fail_runs=1)),
                     *(node.s(Node(name=f"s{i}")) for i in range(1, 1000)))
    nodes = flow.nodes()
    assert len(nodes) == 1000
    assert all(list(n.depends_on) == [p.key] for p, n in itertools.pairwise(nodes))
    found = await settled(running, (await flow.enqueue(name="long")).id)
    assert found.status == "failed"
    assert sorted(t.status for t in found.tasks) == ["cancelled"] * 999 + ["dead"]
