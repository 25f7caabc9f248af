"""The cluster client itself: reads are routed without asking a node, and more callers than
connections wait for one rather than fail."""

from __future__ import annotations

import asyncio

import pytest

from conveyor.queue.connection import open_redis
from conveyor.queue.streams import TaskStreams
from conveyor.state import AppState
from conveyor.testing.redis_ha import ClusterServers
from tests.integration.worker.test_worker import StartWorker, enqueue, wait_for

pytestmark = pytest.mark.slow


async def test_reads_are_routed_without_command_getkeys(
    state: AppState, redis_cluster: ClusterServers, start_worker: StartWorker
) -> None:
    asked = await asyncio.to_thread(redis_cluster.command_calls, "command|getkeys")
    read = await asyncio.to_thread(redis_cluster.command_calls, "xreadgroup")
    await start_worker(types=["echo"])  # blocks in XREADGROUP
    await start_worker(types=["echo", "flaky"])  # reads without blocking, waits in XREAD
    ids = [await enqueue(state, "echo", {}) for _ in range(10)]
    for task_id in ids:
        await wait_for(state, task_id, "succeeded")
    assert await asyncio.to_thread(redis_cluster.command_calls, "xreadgroup") > read
    assert await asyncio.to_thread(redis_cluster.command_calls, "xread") > 0
    assert await asyncio.to_thread(redis_cluster.command_calls, "command|getkeys") == asked


async def test_more_blocking_reads_than_connections_wait_their_turn(state: AppState) -> None:
    redis = open_redis(state.settings, max_connections=3)
    try:
        streams = TaskStreams(redis, state.keys)
        await streams.ensure_group("echo")
        reads = [streams.read("echo", f"c{i}/echo", 1, 100) for i in range(12)]
        assert await asyncio.gather(*reads) == [[]] * 12  # none failed for want of one
    finally:
        await redis.aclose()
