"""A Redis Cluster master dies mid-run (SIGKILL) and its replica is promoted: the workers,
rebalance and relay ride the failover out, every task completes, none is lost, none is
recorded twice. The killed node is started again afterwards and rejoins as a replica."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator

import pytest

from conveyor.state import AppState
from conveyor.testing.redis_ha import ClusterServers
from tests.integration.failover import TYPE, run_through_failover

# redis-py's asyncio cluster client, re-reading the topology after the failover, drops nodes
# it replaces with their connections still open (redis/redis-py#4053, #3572); the garbage
# collector closes them, each with a ResourceWarning. Those finalizers' warnings (and so any
# unclosed socket's) are let pass here, and collected before the test ends so that no later
# test is blamed for them.
LEAKED_BY_THE_CLUSTER_CLIENT = [
    pytest.mark.filterwarnings(
        f"ignore:Exception ignored in. {what}:pytest.PytestUnraisableExceptionWarning")
    for what in ("<socket.socket", "<function StreamWriter.__del__",
                 "<function _SelectorTransport.__del__", "<function AbstractConnection.__del__",
                 "<function ClusterNode.__del__")
]
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("collected"),
              *LEAKED_BY_THE_CLUSTER_CLIENT]


@pytest.fixture
def collected() -> Iterator[None]:
    """Set up before the test's state, so torn down after it: what the closed client leaked
    is collected while this test's filters apply."""
    yield
    gc.collect()


async def test_a_master_killed_mid_run_loses_nothing(
    state: AppState, redis_cluster: ClusterServers
) -> None:
    master = redis_cluster.master_of(state.keys.stream(TYPE))
    replica = redis_cluster.replica_of(master)

    async def kill_the_busy_types_master() -> None:
        await asyncio.to_thread(redis_cluster.kill, master)

    try:
        outcome = await run_through_failover(state, kill_the_busy_types_master)
        assert redis_cluster.roles()[replica] == "master"  # the replica took over
    finally:
        await asyncio.to_thread(redis_cluster.revive, master)
    print(f"failover: {outcome}")
    assert outcome.statuses == {"succeeded": outcome.tasks}
    assert outcome.recorded_twice == []
    # Whatever the dead master had not yet replicated (a publish, a delivery, an ack) is
    # made good without a second attempt: Postgres's compare-and-set turns a redelivered
    # message of a running or finished task away, and no live worker is judged dead.
    assert outcome.attempts == {1: outcome.tasks}
    assert outcome.runs == {1: outcome.tasks}
