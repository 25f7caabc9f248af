"""Which Redis errors are outages (Unavailable), cluster and Sentinel ones included, and how
the cluster client routes stream reads."""

from __future__ import annotations

import pytest
from redis.asyncio.sentinel import MasterNotFoundError
from redis.exceptions import (
    AskError,
    ClusterCrossSlotError,
    ClusterDownError,
    ClusterError,
    MasterDownError,
    MaxConnectionsError,
    MovedError,
    RedisClusterException,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)

from conveyor.config import Settings
from conveyor.errors import Unavailable
from conveyor.queue.connection import GatedCluster, SentinelMaster, open_redis, translate


@pytest.mark.parametrize("error", [
    ClusterDownError("CLUSTERDOWN The cluster is down"),
    MasterDownError("MASTERDOWN Link with MASTER is down"),
    TryAgainError("TRYAGAIN Multiple keys request during rehashing of slot"),
    SlotNotCoveredError('Slot "42" is not covered by the cluster.'),
    ClusterError("TTL exhausted."),
    RedisClusterException("Redis Cluster cannot be connected. Please provide at least one "
                          "reachable node: Error 111"),
    RedisClusterException("All slots are not covered after query all startup_nodes."),
    RedisClusterException("Command # 1 (XADD p:{echo}:stream * id 1) of pipeline caused "
                          "error: Redis Cluster cannot be connected. Please provide at least "
                          "one reachable node: Error 111"),
    MaxConnectionsError("Too many connections"),
    MasterNotFoundError("No master found for 'conveyor'"),
], ids=lambda e: type(e).__name__)
def test_failover_and_cluster_trouble_is_an_outage(error: Exception) -> None:
    with pytest.raises(Unavailable) as caught, translate("streams.read"):
        raise error
    assert caught.value.op == "streams.read"


@pytest.mark.parametrize("error", [
    RedisClusterException("XREADGROUP - all keys must map to the same key slot"),
    ClusterCrossSlotError("CROSSSLOT Keys in request don't hash to the same slot"),
    ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"),
    MovedError("3999 127.0.0.1:6381"),  # followed by the client; never seen if it settles
    AskError("3999 127.0.0.1:6381"),
], ids=lambda e: type(e).__name__)
def test_mistakes_are_not_outages(error: Exception) -> None:
    with pytest.raises(type(error)), translate("streams.read"):
        raise error


def cluster() -> GatedCluster:
    client = open_redis(Settings(redis_url="redis://127.0.0.1:1/0", redis_cluster=True),
                        max_connections=4)
    assert isinstance(client, GatedCluster)
    return client


def test_a_stream_read_is_routed_by_its_stream_keys() -> None:
    client = cluster()
    one = client._stream_slot("XREADGROUP", ("GROUP", "g", "c", "COUNT", "5", b"STREAMS",
                                             "p:{echo}:stream", ">"))
    assert one == client.keyslot("p:{echo}:stream") == client.keyslot("echo")
    two = client._stream_slot("XREAD", ("BLOCK", "100", "STREAMS", "a:{echo}:stream",
                                        "b:{echo}:stream", "0-0", "0-0"))
    assert two == one


def test_a_stream_read_over_two_slots_is_refused() -> None:
    with pytest.raises(RedisClusterException, match="same key slot"):
        cluster()._stream_slot("XREAD", ("STREAMS", "{a}:stream", "{b}:stream", "0", "0"))


def test_sentinels_give_a_client_of_the_named_master() -> None:
    settings = Settings(redis_sentinels=["127.0.0.1:26379", "[::1]:26380"],
                        redis_sentinel_master="main",
                        redis_url="redis://user:p%40ss@ignored:1/2")
    client = open_redis(settings, max_connections=4)
    assert isinstance(client, SentinelMaster)
    kwargs = client.connection_pool.connection_kwargs
    assert (kwargs["username"], kwargs["password"], kwargs["db"]) == ("user", "p@ss", 2)
    assert client.connection_pool.service_name == "main"  # type: ignore[attr-defined]
    assert client.sentinels is not None
    assert [s.connection_pool.connection_kwargs["port"] for s in client.sentinels.sentinels
            ] == [26379, 26380]
