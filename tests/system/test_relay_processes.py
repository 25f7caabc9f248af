"""Three `conveyor cron` processes, one NOTIFY listener: a transactional enqueue reaches the
stream once, and still reaches it when the listening process is SIGKILLed."""

from __future__ import annotations

import signal
import uuid
from typing import Any

import pytest

from conveyor.client import Client, TaskRequest, insert_in_transaction
from conveyor.state import AppState
from tests.apps import system
from tests.conftest import eventually
from tests.system.conftest import ROOT, Proc, Spawner

pytestmark = pytest.mark.slow
APP = ["--app", "tests.apps.system:app"]
SOURCES = f"{ROOT / 'src'}:{ROOT}"  # this checkout's package, not the installed one


async def streamed(state: AppState) -> list[uuid.UUID]:
    entries: Any = await state.redis.xrange(state.keys.stream("work"))
    return [uuid.UUID(fields[b"id"].decode()) for _, fields in entries]


async def enqueue_in_transaction(state: AppState, client: Client) -> uuid.UUID:
    async with state.pool.acquire() as conn, conn.transaction():
        return (await insert_in_transaction(client, conn, TaskRequest("work", {}))).id


def leaders(procs: list[Proc]) -> list[Proc]:
    return [p for p in procs if "relay.listen.leading" in p.output()]


async def test_one_of_three_cron_processes_publishes_and_a_survivor_covers_its_death(
    state: AppState, spawn: Spawner
) -> None:
    client = Client(state.store, state.streams, system.app.registry)
    procs = [spawn("cron", *APP, PYTHONPATH=SOURCES) for _ in range(3)]

    async def led() -> bool:
        return bool(leaders(procs))

    async def on_stream(*ids: uuid.UUID) -> bool:
        return set(ids) <= set(await streamed(state))

    await eventually(led, timeout_s=30)
    first = await enqueue_in_transaction(state, client)
    await eventually(lambda: on_stream(first))
    # Each process heard the first NOTIFY, if at all, before the second one.
    second = await enqueue_in_transaction(state, client)
    await eventually(lambda: on_stream(second))
    assert await streamed(state) == [first, second]
    [leader] = leaders(procs)

    leader.signal(signal.SIGKILL)
    leader.wait()
    survivors = [p for p in procs if p is not leader]
    # Its NOTIFY reaches nobody until a survivor takes the lease: the scan publishes it, once
    # it is overdue by the grace. Killed mid-tick, the leader may still hold the scan's lock,
    # which frees itself after its TTL (30 s at least): a scan is then that late.
    third = await enqueue_in_transaction(state, client)
    await eventually(lambda: on_stream(third), timeout_s=45)

    async def taken_over() -> bool:
        return bool(leaders(survivors))

    await eventually(taken_over, timeout_s=30)
    fourth = await enqueue_in_transaction(state, client)
    await eventually(lambda: on_stream(fourth), timeout_s=30)
