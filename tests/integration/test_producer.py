"""Producers enqueue through connections of their own; a real worker runs what they enqueue."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from conveyor.application import Conveyor
from conveyor.config import Settings
from conveyor.errors import ConfigError, PayloadInvalid, UnknownTaskType
from conveyor.producer import Producer, SyncProducer
from conveyor.state import AppState
from conveyor.store.tasks import TaskRecord
from conveyor.worker.worker import Worker
from tests.apps import produced
from tests.apps.produced import Number, square
from tests.conftest import eventually

ROOT = Path(__file__).resolve().parents[2]

PRODUCER_SCRIPT = """
import json
import os
from conveyor.producer import SyncProducer
from tests.apps.produced import Number, app, cube, square

producer = SyncProducer(app)                       # settings from the environment
second = cube.enqueue_sync(Number(n=4), idempotency_key="cube-4")   # connects the producer
first = producer.enqueue(square, Number(n=3))
again = cube.enqueue_sync(Number(n=4), idempotency_key="cube-4")
child = os.fork()
if child == 0:  # the parent's connections and loop thread are not the child's: it connects anew
    forked = square.enqueue_sync(Number(n=5))
    producer.close()
    print(json.dumps({"forked": str(forked.id)}), flush=True)
    os._exit(0)
assert os.waitpid(child, 0)[1] == 0
print(json.dumps([str(first.id), str(second.id), str(again.id)]), flush=True)
# Not closed: the atexit hook closes it, and the daemon loop thread never holds up the exit.
"""


@pytest.fixture
def app() -> Conveyor:
    return produced.app


async def finished(state: AppState, task_id: Any) -> TaskRecord:
    record: TaskRecord | None = None

    async def done() -> bool:
        nonlocal record
        record = await state.client.get(task_id)
        return record.status in ("succeeded", "dead")

    await eventually(done, timeout_s=60)
    assert record is not None
    return record


async def schema_exists(settings: Settings) -> bool:
    assert settings.database_url
    conn = await asyncpg.connect(settings.database_url)
    try:
        return bool(await conn.fetchval("SELECT to_regnamespace($1) IS NOT NULL",
                                        settings.database_schema))
    finally:
        await conn.close()


def run_script(env: dict[str, str]) -> tuple[int, str, str]:
    """Run PRODUCER_SCRIPT in a session of its own, so that a hung run (its fork included)
    is killed whole."""
    proc = subprocess.Popen([sys.executable, "-c", PRODUCER_SCRIPT], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        stderr += "\n(timed out after 60 s)"
    return proc.returncode, stdout, stderr


@pytest.mark.slow
async def test_a_producer_in_another_process_enqueues_tasks_a_worker_runs(
    state: AppState, start_worker: Callable[..., Awaitable[Worker]]
) -> None:
    settings = state.settings
    assert settings.database_url
    assert settings.redis_url
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    env.update({
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
        "DATABASE_URL": settings.database_url,
        "REDIS_URL": settings.redis_url,
        "CONVEYOR_DATABASE_SCHEMA": settings.database_schema,
        "CONVEYOR_KEY_PREFIX": settings.key_prefix,
    })
    returncode, stdout, stderr = await asyncio.to_thread(run_script, env)
    assert returncode == 0, stderr
    forked_line, last_line = stdout.strip().splitlines()[-2:]
    forked = json.loads(forked_line)["forked"]
    first, second, again = json.loads(last_line)
    assert again == second  # the idempotency key returned the first task
    await start_worker()
    squared = await finished(state, first)
    assert (squared.status, squared.result) == ("succeeded", {"square": 9})
    assert (await finished(state, forked)).result == {"square": 25}
    cubed = await finished(state, second)
    assert cubed.status == "succeeded", cubed.last_error
    assert cubed.result["cube"] == 64
    assert cubed.result["pid"] != os.getpid()  # the decorated handler ran in a process pool


async def test_an_async_producer_enqueues_typed_and_by_name_on_its_own_connections(
    state: AppState, start_worker: Callable[..., Awaitable[Worker]]
) -> None:
    await start_worker()
    async with Producer(produced.app, state.settings) as producer:
        by_definition = await producer.enqueue(square, Number(n=2))
        by_name = await producer.enqueue("square", {"n": 5}, max_attempts=7)
        through_app = await square.enqueue(Number(n=6), delay_s=0.3)
        batch = await producer.enqueue_many([square.request(Number(n=i)) for i in range(3)])
        with pytest.raises(PayloadInvalid, match="n"):
            await producer.enqueue("square", {"n": "many"})
        with pytest.raises(PayloadInvalid, match="extra"):
            await producer.enqueue("square", {"n": 1, "colour": "red"})
        with pytest.raises(UnknownTaskType):
            await producer.enqueue("nope", {})
        assert by_name.max_attempts == 7
        assert through_app.run_at > through_app.created_at
        assert (await producer.get(by_definition.id)).type == "square"
    results = [(await finished(state, r.id)).result
               for r in (by_definition, by_name, through_app, *batch)]
    assert results == [{"square": n * n} for n in (2, 5, 6, 0, 1, 2)]


async def test_a_producer_applies_no_migrations_unless_asked(settings: Settings) -> None:
    with pytest.raises(ConfigError, match="conveyor migrate"):
        await Producer(produced.app, settings).open()
    assert not await schema_exists(settings)
    async with Producer(produced.app, settings, migrate=True) as producer:
        record = await producer.enqueue(square, Number(n=1))
        assert record.status == "queued"
    assert await schema_exists(settings)
    assert settings.database_url
    conn = await asyncpg.connect(settings.database_url)
    await conn.execute(f"DROP SCHEMA {settings.database_schema} CASCADE")
    await conn.close()


@pytest.fixture
async def sync_producer(settings: Settings) -> AsyncIterator[SyncProducer]:
    producer = SyncProducer(produced.app, settings, migrate=True)
    yield producer
    await asyncio.to_thread(producer.close)
    produced.app.connect_on_demand(None)
    assert settings.database_url
    conn = await asyncpg.connect(settings.database_url)
    await conn.execute(f"DROP SCHEMA IF EXISTS {settings.database_schema} CASCADE")
    await conn.close()


async def test_a_sync_producer_serves_threads_and_other_loops_then_lets_go(
    sync_producer: SyncProducer,
) -> None:
    # Nothing is open yet: the definition has the app's sync producer connect (in a thread).
    first = await square.enqueue(Number(n=1))
    assert first.status == "queued"
    records = await asyncio.gather(*(
        asyncio.to_thread(sync_producer.enqueue, square, Number(n=n)) for n in range(8)
    ))
    assert len({r.id for r in records}) == 8
    from_thread = await asyncio.to_thread(square.enqueue_sync, Number(n=10))
    # From this loop, the task definition hops to the producer's loop and back.
    from_loop = await square.enqueue(Number(n=11), idempotency_key="eleven")
    assert (await square.enqueue(Number(n=11), idempotency_key="eleven")).id == from_loop.id
    fetched = await asyncio.to_thread(sync_producer.get, from_thread.id)
    assert (fetched.status, fetched.payload) == ("queued", {"n": 10})
    await asyncio.to_thread(sync_producer.close)
    reopened = await asyncio.to_thread(square.enqueue_sync, Number(n=12))  # connects again
    assert (await asyncio.to_thread(sync_producer.get, reopened.id)).payload == {"n": 12}


async def test_enqueue_sync_on_the_loop_serving_the_connections_is_refused(
    state: AppState,
) -> None:
    with pytest.raises(ConfigError, match="would block"):
        square.enqueue_sync(Number(n=1))
    record = await square.enqueue(Number(n=1))
    assert (await state.client.get(record.id)).status == "queued"
