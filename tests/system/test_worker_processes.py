"""`conveyor worker --processes 2` and the metrics port of `worker` and `cron` processes, as
real processes on real servers."""

from __future__ import annotations

import os
import signal
import uuid
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conveyor.client import Client
from conveyor.queue.keys import GROUP
from conveyor.state import AppState
from conveyor.testing.servers import free_port
from tests.apps import system
from tests.conftest import eventually
from tests.system.conftest import Proc, Spawner

pytestmark = pytest.mark.slow
APP = ["--app", "tests.apps.system:app"]
BACKLOG_FAMILIES = {"conveyor_queue_depth", "conveyor_queue_lag",
                    "conveyor_queue_oldest_age_seconds"}


def client_for(state: AppState) -> Client:
    return Client(state.store, state.streams, system.app.registry)


async def get(port: int, path: str) -> httpx.Response | None:
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=2) as http:
            return await http.get(path)
    except httpx.HTTPError:
        return None


async def scrape(port: int) -> dict[str, list[Any]]:
    """Families of `/metrics` by name, each with its samples."""
    response = await get(port, "/metrics")
    assert response is not None
    assert response.status_code == 200
    return {f.name: f.samples for f in text_string_to_metric_families(response.text)}


def total(families: dict[str, list[Any]], name: str, **labels: str) -> float:
    return sum(float(s.value) for s in families.get(name, [])
               if s.name == f"{name}_total" and labels.items() <= s.labels.items())


async def live_pids(state: AppState) -> set[int]:
    return {w.pid for w in await state.workers.live(60)}


async def succeeded(state: AppState, ids: list[uuid.UUID]) -> bool:
    for task_id in ids:
        record = await state.store.get(task_id)
        if record is None or record.status != "succeeded":
            return False
    return True


async def workers_of(state: AppState, ids: list[uuid.UUID]) -> set[str]:
    records = [await state.store.get(t) for t in ids]
    return {r.worker for r in records if r is not None and r.worker}


async def two_worker_processes(state: AppState, spawn: Spawner, port: int) -> Proc:
    """`conveyor worker --processes 2` with its metrics on `port`, once both children beat."""
    proc = spawn("worker", *APP, "--types", "work", "--processes", "2", "--concurrency", "1",
                 CONVEYOR_METRICS_PORT=str(port))

    async def two_children() -> bool:
        return len(await live_pids(state)) == 2

    await eventually(two_children, timeout_s=30)
    return proc


async def test_two_processes_share_the_work_sum_their_metrics_and_drain_on_sigterm(
    state: AppState, spawn: Spawner
) -> None:
    port = free_port()
    proc = await two_worker_processes(state, spawn, port)
    children = await live_pids(state)
    assert proc.pid not in children
    client = client_for(state)
    ids = [(await client.enqueue("work", {"seconds": 0.5})).record.id for _ in range(6)]
    await eventually(lambda: succeeded(state, ids), timeout_s=30)
    ran_on = await workers_of(state, ids)
    assert len(ran_on) == 2  # one slot each: both children took some
    assert {int(w.split("-")[-2]) for w in ran_on} == children

    families = await scrape(port)
    assert families.keys() >= BACKLOG_FAMILIES
    assert total(families, "conveyor_tasks_finished", type="work", outcome="succeeded") == 6
    assert total(families, "conveyor_tasks_started", type="work") == 6
    lag = {s.labels["type"]: s.value for s in families["conveyor_queue_lag"]}
    assert lag["work"] == 0
    in_flight = families["conveyor_worker_in_flight"]
    assert len(in_flight) == 1  # one series: the live children's sum
    health = await get(port, "/healthz")
    assert health is not None
    assert health.json() == {"status": "ok", "processes": 2, "wanted": 2, "restarts": 0}

    draining = [(await client.enqueue("work", {"seconds": 3})).record.id for _ in range(2)]

    async def running() -> int:
        return int(await state.redis.get(f"{state.keys.prefix}:test:running") or 0)

    async def both_running() -> bool:
        return await running() == 2

    await eventually(both_running, timeout_s=20)
    proc.signal(signal.SIGTERM)
    during = await get(port, "/healthz")  # the metrics port serves through the drain
    assert await running() == 2
    assert during is not None
    assert during.status_code == 200
    assert proc.wait(40) == 0, proc.output()[-3000:]
    assert await succeeded(state, draining)
    for task_id in draining:
        assert int(await state.redis.get(system.runs_key(state.keys.prefix, str(task_id)))
                   or 0) == 1
    summary: Any = await state.redis.xpending(state.keys.stream("work"), GROUP)
    assert summary["pending"] == 0
    assert await state.workers.live(60) == []
    assert proc.output().count('"process.drained"') == 2


async def test_a_killed_child_is_replaced_and_its_replacement_works(
    state: AppState, spawn: Spawner
) -> None:
    port = free_port()
    proc = await two_worker_processes(state, spawn, port)
    first = await live_pids(state)
    victim = min(first)
    os.kill(victim, signal.SIGKILL)

    async def replaced() -> bool:
        response = await get(port, "/healthz")
        return (response is not None and response.json()["restarts"] == 1
                and len((await live_pids(state)) - first) == 1)

    await eventually(replaced, timeout_s=30)  # the victim's row stays until its TTL
    newcomer = ((await live_pids(state)) - first).pop()
    client = client_for(state)
    ids = [(await client.enqueue("work", {"seconds": 0.5})).record.id for _ in range(4)]
    await eventually(lambda: succeeded(state, ids), timeout_s=30)
    pids = {int(w.split("-")[-2]) for w in await workers_of(state, ids)}
    assert newcomer in pids
    assert victim not in pids
    assert '"process.died"' in proc.output()
    proc.signal(signal.SIGTERM)
    assert proc.wait(40) == 0, proc.output()[-3000:]


async def test_worker_and_cron_processes_serve_metrics_and_health(
    state: AppState, spawn: Spawner
) -> None:
    worker_port, cron_port = free_port(), free_port()
    spawn("worker", *APP, "--types", "work,tick", CONVEYOR_METRICS_PORT=str(worker_port))
    spawn("cron", *APP, CONVEYOR_METRICS_PORT=str(cron_port))

    async def up(port: int) -> bool:
        response = await get(port, "/healthz")
        return response is not None and response.status_code == 200

    await eventually(lambda: up(worker_port), timeout_s=30)
    await eventually(lambda: up(cron_port), timeout_s=30)
    task_id = (await client_for(state).enqueue("work", {})).record.id
    await eventually(lambda: succeeded(state, [task_id]), timeout_s=20)

    async def fired() -> bool:
        return total(await scrape(cron_port), "conveyor_cron_fired") >= 1

    await eventually(fired, timeout_s=20)
    worker = await scrape(worker_port)
    assert worker.keys() >= BACKLOG_FAMILIES
    assert total(worker, "conveyor_tasks_finished", type="work", outcome="succeeded") == 1
    assert {"conveyor_worker_in_flight", "conveyor_task_duration_seconds"} <= worker.keys()
    cron = await scrape(cron_port)
    assert cron.keys() >= BACKLOG_FAMILIES
    types = {s.labels["type"] for s in cron["conveyor_queue_lag"]}
    assert types == set(system.app.registry.types)
    ages = [s.value for s in cron["conveyor_queue_oldest_age_seconds"]]
    assert all(age >= 0 for age in ages)
