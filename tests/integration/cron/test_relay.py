"""The relay: committed tasks reach Redis after a lost publish, FLUSHALL or a lost worker."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from conveyor.client import TaskRequest
from conveyor.cron.relay import Relay
from conveyor.queue.keys import consumer_name
from conveyor.runtime.shutdown import Shutdown
from conveyor.state import AppState
from conveyor.worker.worker import Worker
from tests.apps import basic
from tests.conftest import eventually, judge

StartWorker = Callable[..., Awaitable[Worker]]


def relay(state: AppState, grace_s: float = 0.5) -> Relay:
    return Relay(
        state.redis, state.keys, state.streams, state.store, list(state.app.registry.types),
        liveness=judge(state), interval_s=0.2, grace_s=grace_s, ttl_s=state.settings.heartbeat_ttl,
    )


async def insert_unpublished(state: AppState, n: int, task_type: str = "echo") -> list[uuid.UUID]:
    """A crash between commit and XADD: rows committed, nothing published."""
    new = [state.client.prepare(TaskRequest(task_type, {})) for _ in range(n)]
    await state.store.insert(new)
    return [t.id for t in new]


async def succeeded(state: AppState, ids: list[uuid.UUID]) -> bool:
    for task_id in ids:
        record = await state.store.get(task_id)
        if record is None or record.status != "succeeded":
            return False
    return True


async def test_tasks_committed_but_never_published_are_relayed(
    state: AppState, start_worker: StartWorker
) -> None:
    ids = await insert_unpublished(state, 3)
    await start_worker()
    r = relay(state, grace_s=0.5)
    assert await r.relay_overdue("echo") == 0  # within the grace period: maybe in flight
    await asyncio.sleep(0.6)
    assert await r.relay_overdue("echo") == 3
    await eventually(lambda: succeeded(state, ids))
    assert await r.relay_overdue("echo") == 0
    assert all(basic.probe.runs[str(i)] == 1 for i in ids)


async def test_flushall_loses_nothing(state: AppState, start_worker: StartWorker) -> None:
    ids = [(await state.client.enqueue("echo", {})).record.id for _ in range(5)]
    await state.redis.flushall()
    worker = await start_worker()
    later = (await state.client.enqueue("echo", {})).record.id  # published after the wipe
    await eventually(lambda: succeeded(state, [later]))
    assert not await succeeded(state, ids)
    await asyncio.sleep(0.6)
    assert await relay(state).relay_overdue("echo") == 5
    await eventually(lambda: succeeded(state, ids))
    assert worker.processed == 6
    assert all(basic.probe.runs[str(i)] == 1 for i in [*ids, later])


async def test_backlog_in_redis_is_not_republished(state: AppState) -> None:
    await state.client.enqueue("echo", {})
    await asyncio.sleep(0.6)
    assert await relay(state).relay_overdue("echo") == 0  # it is in the stream, undelivered


async def test_delayed_tasks_in_the_delayed_set_are_not_republished(state: AppState) -> None:
    task = (await state.client.enqueue("echo", {}, delay_s=0.3)).record
    await asyncio.sleep(0.9)  # overdue by more than the grace, but still waiting in Redis
    assert await state.redis.zscore(state.keys.delayed("echo"), str(task.id)) is not None
    assert await relay(state).relay_overdue("echo") == 0


async def test_running_task_of_a_dead_worker_whose_message_was_lost_is_requeued(
    state: AppState, start_worker: StartWorker
) -> None:
    task_id = (await state.client.enqueue("echo", {})).record.id
    # A worker took it and died; then Redis lost everything, the pending entry included.
    await state.streams.ensure_group("echo")
    await state.streams.read("echo", consumer_name("ghost", "echo"), 1, None)
    started, _ = await state.store.mark_running([task_id], "ghost")
    assert len(started) == 1
    await state.redis.flushall()
    await state.pool.execute(
        f"UPDATE {state.store.table} SET started_at = now() - interval '1 hour' WHERE id = $1",
        task_id,
    )
    await state.workers.beat("ghost", host="h", pid=1, types=["echo"], concurrency=1, info={})
    await state.pool.execute(  # its last beat, long ago
        f"UPDATE {state.workers.table} SET beat_at = now() - interval '1 hour'")
    await start_worker()
    r = relay(state)
    now = [0.0]
    r.liveness.clock = lambda: now[0]
    assert await r.relay_orphans() == 0  # stale at one look is not yet dead
    now[0] += r.liveness.confirm_s
    assert await r.relay_orphans() == 1  # and still stale a confirmation window later
    await eventually(lambda: succeeded(state, [task_id]))
    record = await state.store.get(task_id)
    assert record is not None
    assert record.attempts == 2


async def test_orphans_still_pending_in_redis_are_left_to_the_rebalancer(state: AppState
                                                                        ) -> None:
    task_id = (await state.client.enqueue("echo", {})).record.id
    await state.streams.ensure_group("echo")
    await state.streams.read("echo", consumer_name("ghost", "echo"), 1, None)
    await state.store.mark_running([task_id], "ghost")
    await state.pool.execute(
        f"UPDATE {state.store.table} SET started_at = now() - interval '1 hour' WHERE id = $1",
        task_id,
    )
    assert await relay(state).relay_orphans() == 0


async def test_transactional_enqueue_publishes_on_commit_only(
    state: AppState, start_worker: StartWorker
) -> None:
    r = relay(state, grace_s=60)  # the scan cannot be what publishes here
    stop = Shutdown()
    relaying = asyncio.create_task(r.run(stop))
    await start_worker()
    try:
        await eventually(lambda: _true(r.listening))  # a NOTIFY before its LISTEN is lost
        async with state.pool.acquire() as conn:
            async with conn.transaction():
                committed = await state.app.enqueue(conn, "echo", {"value": "kept"})
            tx = conn.transaction()
            await tx.start()
            rolled_back = await state.app.enqueue(conn, "echo", {"value": "dropped"})
            await tx.rollback()
        await eventually(lambda: succeeded(state, [committed.id]))
        assert await state.store.get(rolled_back.id) is None
        assert basic.probe.runs[str(rolled_back.id)] == 0
    finally:
        stop.begin()
        await relaying



# -- one listener however many relays run ---------------------------------------------------


async def streamed(state: AppState, task_type: str = "echo") -> list[uuid.UUID]:
    """Task ids of every message on the type's stream, in order."""
    entries: Any = await state.redis.xrange(state.keys.stream(task_type))
    return [uuid.UUID(fields[b"id"].decode()) for _, fields in entries]


async def enqueue_in_transaction(state: AppState) -> uuid.UUID:
    async with state.pool.acquire() as conn, conn.transaction():
        return (await state.app.enqueue(conn, "echo", {})).id


def listening_relay(state: AppState) -> Relay:
    """Scan out of the way (a minute's grace): only the listener can publish within a test."""
    return Relay(
        state.redis, state.keys, state.streams, state.store, list(state.app.registry.types),
        liveness=judge(state), interval_s=0.2, grace_s=60, ttl_s=state.settings.heartbeat_ttl,
        lease_ttl_s=2.0,
    )


async def test_three_relays_publish_a_transactional_enqueue_once(state: AppState) -> None:
    relays = [listening_relay(state) for _ in range(3)]
    stop = Shutdown()
    running = [asyncio.create_task(r.run(stop)) for r in relays]
    try:
        # listening, not only leading: a NOTIFY sent before the LISTEN is left to the scan
        await eventually(lambda: _true(any(r.listening for r in relays)))
        first = await enqueue_in_transaction(state)
        await eventually(lambda: _len_at_least(state, 1))
        # Every relay saw the first NOTIFY before the second: once the second is on the stream
        # a copy of the first from another relay would be there too.
        second = await enqueue_in_transaction(state)
        await eventually(lambda: _len_at_least(state, 2))
        assert await streamed(state) == [first, second]
        assert sum(r.leading for r in relays) == 1
    finally:
        stop.begin()
        await asyncio.gather(*running)
    assert await state.redis.get(state.keys.lock("relay.listen")) is None  # released on stop


async def test_a_standby_takes_over_when_the_listener_stops(state: AppState) -> None:
    a, b = listening_relay(state), listening_relay(state)
    stop_a, stop_b = Shutdown(), Shutdown()
    running_a = asyncio.create_task(a.run(stop_a))
    await eventually(lambda: _true(a.leading))
    running_b = asyncio.create_task(b.run(stop_b))
    try:
        stop_a.begin()
        await running_a
        await eventually(lambda: _true(b.listening))
        task_id = await enqueue_in_transaction(state)
        await eventually(lambda: _len_at_least(state, 1))
        assert await streamed(state) == [task_id]
    finally:
        stop_b.begin()
        await running_b


async def test_a_task_notified_while_the_listener_is_dead_is_published_all_the_same(
    state: AppState,
) -> None:
    def relay_(grace_s: float) -> Relay:
        return Relay(
            state.redis, state.keys, state.streams, state.store,
            list(state.app.registry.types), liveness=judge(state), interval_s=0.2,
            grace_s=grace_s,
            ttl_s=state.settings.heartbeat_ttl, lease_ttl_s=2.0,
        )

    dead, standby = relay_(60), relay_(0.5)
    stop_dead, stop = Shutdown(), Shutdown()
    running_dead = asyncio.create_task(dead.run(stop_dead))
    await eventually(lambda: _true(dead.leading))
    # Killed: it stops listening but never releases its lease, which runs out on its own.
    running_dead.cancel()
    await asyncio.gather(running_dead, return_exceptions=True)
    lease = state.keys.lock("relay.listen")
    assert await state.redis.set(lease, dead.lease.token, nx=True, px=dead.lease.ttl_ms)
    running = asyncio.create_task(standby.run(stop))
    try:
        missed = await enqueue_in_transaction(state)  # nobody listens: the scan's job
        assert not standby.leading
        await eventually(lambda: _true(standby.listening), timeout_s=10)
        heard = await enqueue_in_transaction(state)
        await eventually(lambda: _has(state, {missed, heard}), timeout_s=10)
    finally:
        stop.begin()
        await running


async def _true(value: bool) -> bool:
    return value


async def _len_at_least(state: AppState, n: int) -> bool:
    return len(await streamed(state)) >= n


async def _has(state: AppState, ids: set[uuid.UUID]) -> bool:
    return ids <= set(await streamed(state))


async def test_an_orphan_asked_to_cancel_ends_cancelled_and_is_announced(state: AppState
                                                                        ) -> None:
    task_id = (await state.client.enqueue("echo", {})).record.id
    await state.streams.ensure_group("echo")
    await state.streams.read("echo", consumer_name("ghost", "echo"), 1, None)
    started, _ = await state.store.mark_running([task_id], "ghost")
    assert len(started) == 1
    assert await state.store.request_cancel(task_id)
    await state.redis.flushall()  # the pending entry is gone with everything else
    await state.pool.execute(
        f"UPDATE {state.store.table} SET started_at = now() - interval '1 hour' WHERE id = $1",
        task_id,
    )
    waiting = asyncio.create_task(state.client.wait(task_id, 60))
    await asyncio.sleep(0.2)  # the waiter is listening before the transition
    r = relay(state)
    r.events = state.events
    assert await r.relay_orphans() == 0  # nothing to publish: it is over
    done = await asyncio.wait_for(waiting, 10)
    assert done.status == "cancelled"
