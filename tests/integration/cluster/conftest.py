"""Tests on the session's Redis Cluster: `settings` name one of its nodes, with
CONVEYOR_REDIS_CLUSTER on, so `state` and the worker fixtures run against the cluster."""

from __future__ import annotations

import pytest

from conveyor.config import Settings
from conveyor.testing.redis_ha import ClusterServers
from conveyor.testing.servers import PostgresServer
from tests.conftest import make_settings


@pytest.fixture
def settings(postgres: PostgresServer, redis_cluster: ClusterServers) -> Settings:
    redis_cluster.wait_healthy()
    # two workers (as in the failover test) pin four Postgres connections
    return make_settings(postgres, redis_cluster.url, redis_cluster=True, pg_pool_max=12)
