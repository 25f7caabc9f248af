"""Flow control inside one process, on real servers: several workers of one app share the
limits through Redis (the subprocess tests in tests/system/test_flow.py do it across
processes)."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from conveyor.client import TaskRequest
from conveyor.state import AppState
from conveyor.store.queue_settings import QueueSettingsStore
from tests.apps.flow import key
from tests.conftest import eventually
from tests.integration.flow.conftest import (
    StartWorker,
    finished,
    number,
    order,
    peak,
    with_concurrency,
)


async def test_global_concurrency_is_shared_by_workers(state: AppState,
                                                       start_worker: StartWorker) -> None:
    for _ in range(3):
        await start_worker(types=["limited"])
    inserted = await state.client.enqueue_many(
        [TaskRequest("limited", {"seconds": 0.03}) for _ in range(60)])
    await eventually(lambda: finished(state, [i.record.id for i in inserted]), 30)
    assert await peak(state, "limited") == 3

    async def none_held() -> bool:  # leases kept for a next read are given back once idle
        return int(await state.redis.zcard(state.keys.leases("limited"))) == 0

    await eventually(none_held, 5)


async def test_keyed_concurrency_per_tenant(state: AppState, start_worker: StartWorker) -> None:
    for _ in range(2):
        await start_worker(types=["keyed"])
    inserted = await state.client.enqueue_many(
        [TaskRequest("keyed", {"seconds": 0.05, "tenant": f"t{i % 3}"}) for i in range(30)])
    await eventually(lambda: finished(state, [i.record.id for i in inserted]), 30)
    for tenant in range(3):
        assert await peak(state, f"keyed:t{tenant}") == 2
    attempts = {(await state.store.get(i.record.id)).attempts  # type: ignore[union-attr]
                for i in inserted}
    assert attempts == {1}  # a put-back start is not an attempt


async def test_unique_for_dedups_concurrent_enqueues(state: AppState) -> None:
    async def one() -> Any:
        return (await state.client.enqueue("plain", {"label": "x"}, unique_for=60)).record.id
    ids = await asyncio.gather(*(one() for _ in range(50)))
    assert len(set(ids)) == 1
    other = await state.client.enqueue("plain", {"label": "y"}, unique_for=60)
    assert other.record.id != ids[0]
    assert other.created


async def test_priorities_high_first_low_not_starved(state: AppState,
                                                     start_worker: StartWorker) -> None:
    await state.client.enqueue_many(
        [TaskRequest("ranked", {"label": f"low{i}"}, priority="low") for i in range(20)]
        + [TaskRequest("ranked", {"label": f"high{i}"}, priority="high") for i in range(20)])
    await start_worker(types=["ranked"], state=with_concurrency(state, 1))
    await eventually(lambda: _count(state, 40), 30)
    first = (await order(state))[:13]
    print("first starts:", first)
    assert sum(x.startswith("high") for x in first) >= 10
    assert any(x.startswith("low") for x in first)  # its share, though high ones wait


async def test_high_starts_within_one_read_behind_a_low_backlog(
        state: AppState, start_worker: StartWorker) -> None:
    await state.client.enqueue_many(
        [TaskRequest("ranked", {"label": f"low{i}", "seconds": 0.005}, priority="low")
         for i in range(1000)])
    await start_worker(types=["ranked"])
    await eventually(lambda: _count(state, 20), 30)
    await state.client.enqueue("ranked", {"label": "high"}, priority="high")
    before = len(await order(state))
    await eventually(lambda: _has(state, "high"), 30)
    position = (await order(state)).index("high")
    print(f"high started after {position - before} low starts past its enqueue")
    assert position - before <= 5  # the reads in flight when it came, at most one batch


async def _count(state: AppState, n: int) -> bool:
    return len(await order(state)) >= n


async def _has(state: AppState, label: str) -> bool:
    return label in await order(state)


async def test_ready_sets_count_as_waiting_for_the_gauges_and_the_relay(
        state: AppState) -> None:
    ids = [i.record.id for i in await state.client.enqueue_many(
        [TaskRequest("ranked", {}, priority=p) for p in ("high", "default", "low")])]
    stats = (await state.streams.stats(["ranked"]))["ranked"]
    assert stats.undelivered == 3
    assert stats.length == 0  # nothing entered the stream yet
    assert (await state.streams.oldest_undelivered_age_ms(["ranked"]))["ranked"] is not None
    assert await state.streams.delayed_among("ranked", ids) == set(ids)  # the relay skips them


async def test_leases_lost_with_redis_come_back_at_the_next_renewal(
    state: AppState, start_worker: StartWorker
) -> None:
    # Three slots, all busy: the consumer asks for no lease while they run, so what the lease
    # set holds after the wipe is what the renewals put back.
    short = dataclasses.replace(state, settings=state.settings.model_copy(update={
        "flow_lease_ttl": 1.5, "concurrency": 3}))  # renewed every 0.5 s
    await start_worker(types=["limited"], state=short)
    await state.client.enqueue_many(
        [TaskRequest("limited", {"seconds": 3.0}) for _ in range(4)])
    leases = state.keys.leases("limited")

    async def running() -> bool:
        return await number(state, "running", "limited") == 3

    await eventually(running, 10)
    await state.redis.delete(leases)  # a wipe, a failover to a replica without them

    async def back() -> bool:
        return int(await state.redis.zcard(leases)) == 3

    await eventually(back, 2)  # the running handlers' leases, at the next renewal


async def test_a_lower_limit_holds_although_freed_leases_are_kept_for_the_next_read(
    state: AppState, start_worker: StartWorker
) -> None:
    worker = await start_worker(types=["limited"])
    await state.client.enqueue_many(
        [TaskRequest("limited", {"seconds": 0.05}) for _ in range(200)])
    await eventually(lambda: _peaked(state, 3), 20)
    await QueueSettingsStore(state.pool, state.settings.database_schema).change(
        "limited", {"max_concurrency": 1}, worker.gate.declared["limited"])
    await worker.gate.reload()
    await asyncio.sleep(0.3)  # the handlers started under 3 finish
    await state.redis.set(key(state.settings.key_prefix, "peak", "limited"), 0)
    await asyncio.sleep(1.0)
    seen = await peak(state, "limited")
    print(f"max_concurrency 3 → 1: peak {seen} afterwards")
    assert seen == 1


async def _peaked(state: AppState, n: int) -> bool:
    return await peak(state, "limited") >= n
