"""Rebalance on real Redis and Postgres: a dead worker's messages go to a live one."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from conveyor.cron.rebalance import Rebalancer
from conveyor.queue.keys import GROUP, consumer_name
from conveyor.runtime.shutdown import Shutdown
from conveyor.state import AppState
from conveyor.worker.worker import Worker
from tests.apps import basic
from tests.conftest import eventually, judge


def rebalancer(state: AppState, *, max_requeues: int = 5) -> Rebalancer:
    return Rebalancer(
        state.redis, state.keys, state.streams, state.store, list(state.app.registry.types),
        liveness=judge(state), interval_s=0.2, ttl_s=state.settings.heartbeat_ttl,
        max_requeues=max_requeues, events=state.events,
    )


async def consumers(state: AppState, task_type: str) -> list[str]:
    return [c.name for c in await state.streams.consumers(task_type)]


async def crash(worker: Worker, running: asyncio.Task[None], shutdown: Shutdown) -> None:
    """Stop a worker the way SIGKILL would look to Redis: no drain, no ack, heartbeat left to
    expire on its own."""
    shutdown.force()
    await asyncio.gather(running, return_exceptions=True)


async def test_messages_of_a_dead_worker_are_handed_to_a_live_one(state: AppState) -> None:
    task_id = (await state.client.enqueue("sleep", {"seconds": 2})).record.id
    doomed = Worker(state, types=["sleep"])
    doomed_stop = Shutdown()
    running = asyncio.create_task(doomed.run(doomed_stop))
    await eventually(lambda: _handler_began(task_id))
    await crash(doomed, running, doomed_stop)
    record = await state.store.get(task_id)
    assert record is not None
    assert record.status == "running"
    assert record.worker == doomed.worker_id

    survivor = Worker(state, types=["sleep"])
    survivor_stop = Shutdown()
    survivor_running = asyncio.create_task(survivor.run(survivor_stop))
    balancer = rebalancer(state)
    balancing_stop = Shutdown()
    balancing = asyncio.create_task(balancer.run(balancing_stop))
    try:
        await eventually(lambda: _succeeded(state, task_id), timeout_s=20)
        record = await state.store.get(task_id)
        assert record is not None
        assert record.worker == survivor.worker_id
        assert record.attempts == 2
        assert basic.probe.runs[str(task_id)] == 2
        dead_name = consumer_name(doomed.worker_id, "sleep")
        await eventually(lambda: _gone(state, "sleep", dead_name), timeout_s=10)
    finally:
        balancing_stop.begin()
        survivor_stop.begin()
        await asyncio.gather(balancing, survivor_running)
    summary: Any = await state.redis.xpending(state.keys.stream("sleep"), GROUP)
    assert summary["pending"] == 0


def _missing() -> Any:
    raise AssertionError("task row missing")


async def _handler_began(task_id: uuid.UUID) -> bool:
    return basic.probe.runs[str(task_id)] >= 1


async def _succeeded(state: AppState, task_id: uuid.UUID) -> bool:
    record = await state.store.get(task_id)
    return record is not None and record.status == "succeeded"


async def _gone(state: AppState, task_type: str, name: str) -> bool:
    return name not in await consumers(state, task_type)


async def test_a_live_worker_keeps_its_running_task_and_loses_what_it_never_started(
    state: AppState,
) -> None:
    await state.streams.ensure_group("echo")
    kept_task = (await state.client.enqueue("echo", {})).record.id
    forgotten_task = (await state.client.enqueue("echo", {})).record.id
    live = "alive-1"
    name = consumer_name(live, "echo")
    kept, forgotten = await state.streams.read("echo", name, 10, None)
    await state.store.mark_running([kept_task], live)  # the other's reply was lost: never run
    deadline = asyncio.get_running_loop().time() + state.settings.heartbeat_ttl + 0.3
    while asyncio.get_running_loop().time() < deadline:  # alive, yet refreshing nothing:
        await beat(state, live)  # both messages' idle times pass the TTL
        await asyncio.sleep(0.5)
    requeued, dead = await rebalancer(state).rebalance("echo")
    assert (requeued, dead) == (1, 0)
    pending: Any = await state.redis.xpending_range(state.keys.stream("echo"), GROUP, "-", "+",
                                                    10)
    assert [p["message_id"] for p in pending] == [kept.stream_id]
    statuses = {t: (await state.store.get(t) or _missing()).status
                for t in (kept_task, forgotten_task)}
    assert statuses == {kept_task: "running", forgotten_task: "queued"}  # + a fresh copy:
    copy = await state.streams.read("echo", consumer_name("other", "echo"), 10, None)
    assert [(m.task_id, m.requeues) for m in copy] == [(forgotten_task, 1)]
    assert forgotten.task_id == forgotten_task


async def beat(state: AppState, worker_id: str) -> None:
    await state.workers.beat(worker_id, host="h", pid=1, types=["echo"], concurrency=1,
                             info={}, running=[])


async def test_a_message_idle_for_less_than_the_ttl_stays(state: AppState) -> None:
    await state.streams.ensure_group("echo")
    await state.client.enqueue("echo", {})
    await state.streams.read("echo", consumer_name("gone-1", "echo"), 10, None)
    requeued, _ = await rebalancer(state).rebalance("echo")
    assert requeued == 0  # its worker has no heartbeat, but it was delivered moments ago


async def test_a_message_that_keeps_losing_workers_is_dead_lettered(state: AppState) -> None:
    await state.streams.ensure_group("echo")
    task_id = (await state.client.enqueue("echo", {})).record.id
    balancer = rebalancer(state, max_requeues=2)
    balancer.min_idle_ms = 0  # every "worker" below is dead the moment it reads
    outcomes = []
    for round_ in range(3):
        got = await state.streams.read("echo", consumer_name(f"dead-{round_}", "echo"), 10, None)
        assert len(got) == 1
        assert got[0].requeues == round_
        outcomes.append(await balancer.rebalance("echo"))
    assert outcomes == [(1, 0), (1, 0), (0, 1)]
    record = await state.store.get(task_id)
    assert record is not None
    assert record.status == "dead"
    assert "delivery limit" in (record.last_error or "")
    letters: Any = await state.redis.xrange(state.keys.dead("echo"))
    assert letters[-1][1][b"id"].decode() == str(task_id)


async def test_a_waiter_ends_when_the_rebalancer_dead_letters_its_task(state: AppState
                                                                         ) -> None:
    """Dead-lettering is a transition like any other: its `dead` event ends a wait at once."""
    await state.streams.ensure_group("echo")
    task_id = (await state.client.enqueue("echo", {})).record.id
    waiting = asyncio.create_task(state.client.wait(task_id, 60))
    balancer = rebalancer(state, max_requeues=0)
    balancer.min_idle_ms = 0
    await state.streams.read("echo", consumer_name("dead-0", "echo"), 10, None)
    assert await balancer.rebalance("echo") == (0, 1)
    done = await asyncio.wait_for(waiting, 10)  # not the wait's 60 s
    assert done.status == "dead"
    assert "delivery limit" in (done.last_error or "")


async def test_trim_drops_acked_entries_only(state: AppState) -> None:
    await state.streams.ensure_group("echo")
    for _ in range(6):
        await state.client.enqueue("echo", {})
    name = consumer_name("w", "echo")
    first = await state.streams.read("echo", name, 4, None)
    await state.streams.settle("echo", [m.stream_id for m in first[:1] + first[2:4]])
    # entries: 0 acked, 1 pending, 2-3 acked, 4-5 undelivered
    assert await state.streams.trim("echo") == 1
    assert await state.redis.xlen(state.keys.stream("echo")) == 5
    await state.streams.settle("echo", [first[1].stream_id])
    assert await state.streams.trim("echo") == 3
    remaining: Any = await state.redis.xrange(state.keys.stream("echo"))
    assert len(remaining) == 2  # the undelivered two survive
    rest = await state.streams.read("echo", name, 10, None)
    assert len(rest) == 2


async def test_a_waiter_ends_when_a_lost_workers_task_had_been_asked_to_cancel(
    state: AppState
) -> None:
    """A cancel asked of a task whose worker then died ends it `cancelled` when the rebalancer
    takes it back, and that transition is announced like the others."""
    await state.streams.ensure_group("echo")
    task_id = (await state.client.enqueue("echo", {})).record.id
    await state.streams.read("echo", consumer_name("ghost", "echo"), 10, None)
    started, _ = await state.store.mark_running([task_id], "ghost")
    assert len(started) == 1
    assert await state.store.request_cancel(task_id)  # the flag; the ghost never hears it
    waiting = asyncio.create_task(state.client.wait(task_id, 60))
    balancer = rebalancer(state)
    balancer.min_idle_ms = 0
    await balancer.rebalance("echo")  # the ghost has no beat: it is dead
    done = await asyncio.wait_for(waiting, 10)  # the event, not the wait's 60 s
    assert done.status == "cancelled"
    assert basic.probe.runs[str(task_id)] == 0
