"""The keys a canvas makes up for its unnamed signatures never take a key given to another."""

from __future__ import annotations

from tests.apps import flows
from tests.apps.flows import Node, node


def test_a_made_up_key_steps_aside_for_a_given_one_that_looks_the_same() -> None:
    flow = flows.app.chain(node.s(Node(name="x")), node.s(Node(name="y"), key="0:node"))
    keys = [n.key for n in flow.nodes()]
    assert len(set(keys)) == 2
    assert keys[1] == "0:node"
    assert flow.nodes()[1].depends_on == (keys[0],)
