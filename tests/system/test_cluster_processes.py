"""`conveyor worker` and `conveyor cron` processes on a Redis Cluster: a SIGKILLed worker's
task is rebalanced to another and completed (the single-Redis test, run on the cluster)."""

from __future__ import annotations

import pytest

from conveyor.config import Settings
from conveyor.testing.redis_ha import ClusterServers
from conveyor.testing.servers import PostgresServer
from tests.conftest import make_settings
from tests.system import test_processes as processes

pytestmark = pytest.mark.slow


@pytest.fixture
def settings(postgres: PostgresServer, redis_cluster: ClusterServers) -> Settings:
    redis_cluster.wait_healthy()
    return make_settings(postgres, redis_cluster.url, redis_cluster=True)


test_a_sigkilled_workers_task_is_completed_by_another = (
    processes.test_a_sigkilled_workers_task_is_completed_by_another)
