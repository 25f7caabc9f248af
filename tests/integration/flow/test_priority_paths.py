"""A task's priority survives every path to its type's ready sets, not only a direct enqueue:
the relay's scan after a Redis wipe, its orphan requeue and its NOTIFY path, a delayed task
come due, a retry and a keyed put-back (all via the delayed set and the forwarder), and a
dependent its upstream's success released."""

from __future__ import annotations

import asyncio

from conveyor.client import TaskRequest, insert_in_transaction
from conveyor.cron.relay import Relay
from conveyor.state import AppState
from conveyor.store import notify
from conveyor.store.notify import Enqueued
from conveyor.store.tasks import Outcome
from tests.conftest import eventually, judge
from tests.integration.flow.conftest import StartWorker, order, with_concurrency

LEVELS = ("high", "default", "low")


def relay(state: AppState) -> Relay:
    return Relay(state.redis, state.keys, state.streams, state.store, ["ranked"],
                 liveness=judge(state), interval_s=0.2, grace_s=0.0,
                 ttl_s=state.settings.heartbeat_ttl, ranked=["ranked"])


async def ready(state: AppState) -> dict[str, set[str]]:
    """The members of each ready set of `ranked`."""
    return {level: {m.decode() if isinstance(m, bytes) else str(m) for m in
                    await state.redis.zrange(state.keys.ready("ranked", level), 0, -1)}
            for level in LEVELS}


async def test_a_redis_wipe_puts_each_task_back_in_its_level_and_high_runs_first(
    state: AppState, start_worker: StartWorker
) -> None:
    by_level = {level: [(await state.client.enqueue("ranked", {"label": level},
                                                    priority=level)).record.id
                        for _ in range(3)] for level in LEVELS}
    await state.redis.flushall()
    assert await relay(state).relay_overdue("ranked") == 9
    assert await ready(state) == {lv: {str(i) for i in ids} for lv, ids in by_level.items()}
    await start_worker(types=["ranked"], state=with_concurrency(state, 1))

    async def all_ran() -> bool:
        return len(await order(state)) == 9

    await eventually(all_ran, 20)
    ran = await order(state)
    print(f"order after the wipe: {ran}")
    assert ran[0] == "high"
    last_high = max(i for i, x in enumerate(ran) if x == "high")
    assert last_high < ran.index("low")  # by the weights (9:3:1), every high before a low


async def test_an_orphan_is_requeued_to_its_level(state: AppState) -> None:
    task = (await state.client.enqueue("ranked", {}, priority="low")).record
    await state.store.mark_running([task.id], "gone-worker")
    await state.pool.execute(f"UPDATE {state.store.table} SET started_at = now() - interval"
                             " '1 hour' WHERE id = $1", task.id)
    await state.redis.flushall()
    assert await relay(state).relay_orphans() == 1
    assert (await ready(state))["low"] == {str(task.id)}


async def test_the_notify_path_carries_the_level(state: AppState) -> None:
    heard: list[Enqueued] = []
    async with (state.pool.acquire() as listener,
                notify.listening(listener, state.store.channel, heard.append)):
        async with state.pool.acquire() as conn, conn.transaction():
            record = await insert_in_transaction(
                state.client, conn, TaskRequest("ranked", {}, priority="high"))
        await eventually(lambda: _any(heard), 5)
    assert heard == [Enqueued("ranked", record.id, None, "high")]
    r = relay(state)
    r._on_notify(heard[0])
    r._may_publish = lambda: True  # type: ignore[method-assign]  # as a leading listener
    await r._publish_notified()
    assert (await ready(state))["high"] == {str(record.id)}


async def test_a_released_dependent_goes_to_its_level(state: AppState) -> None:
    upstream = (await state.client.enqueue("ranked", {})).record
    dependents = {level: (await state.client.enqueue_many([TaskRequest(
        "ranked", {}, priority=level, depends_on=[upstream.id])]))[0].record.id
        for level in LEVELS}
    heard: list[Enqueued] = []
    async with (state.pool.acquire() as listener,
                notify.listening(listener, state.store.channel, heard.append)):
        await state.store.mark_running([upstream.id], "w1")
        await state.store.record([Outcome(upstream.id, "ranked", 1, "succeeded", "null")], "w1")

        async def three() -> bool:
            return len(heard) == 3

        await eventually(three, 5)
    assert {t.task_id for t in heard} == set(dependents.values())
    assert all(t.level is None for t in heard)  # the trigger's note names no level
    await state.redis.flushall()
    r = relay(state)
    for t in heard:
        r._on_notify(t)
    r._may_publish = lambda: True  # type: ignore[method-assign]  # as a leading listener
    await r._publish_notified()
    assert await ready(state) == {lv: {str(i)} for lv, i in dependents.items()}
    assert await state.redis.xlen(state.keys.stream("ranked")) == 0


async def _any(items: list[Enqueued]) -> bool:
    return bool(items)


async def test_delayed_tasks_and_retries_come_due_in_their_level(state: AppState) -> None:
    delayed = {level: (await state.client.enqueue("ranked", {}, priority=level,
                                                  delay_s=0.05)).record.id
               for level in LEVELS}
    await asyncio.sleep(0.1)
    assert await state.streams.forward("ranked", ranked=True) == 3
    assert await ready(state) == {lv: {str(i)} for lv, i in delayed.items()}
    assert await state.redis.exists(state.keys.levels("ranked")) == 0  # nothing left behind
    assert await state.redis.xlen(state.keys.stream("ranked")) == 0
    # A retry: the recorded outcome carries the priority the settler keeps for it.
    await state.redis.flushall()
    task = (await state.client.enqueue("ranked", {}, priority="high")).record
    started, _ = await state.store.mark_running([task.id], "w1")
    assert started[0].priority == "high"
    recorded = await state.store.record(
        [Outcome(task.id, "ranked", 1, "queued", error="retry requested: later")], "w1")
    assert recorded[0].priority == "high"
    at_ms = int(recorded[0].run_at.timestamp() * 1000)
    await state.streams.settle("ranked", [], delays=[(task.id, at_ms)],
                               levels={task.id: "high"})
    await asyncio.sleep(0.05)
    assert await state.streams.forward("ranked", ranked=True) == 1
    assert (await ready(state))["high"] == {str(task.id)}
    stored = await state.store.get(task.id)
    assert stored is not None
    assert stored.priority == "high"
