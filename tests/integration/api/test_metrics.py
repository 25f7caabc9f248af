"""`/metrics`: its own key (or none), and the queue depth per type read at scrape time."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import httpx
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from conveyor.api.app import create_app
from conveyor.queue.backlog import Backlog
from conveyor.queue.keys import GROUP
from conveyor.state import AppState


def client_for(state: AppState, **settings: Any) -> httpx.AsyncClient:
    changed = state.settings.model_copy(update=settings)
    app = create_app(dataclasses.replace(state, settings=changed))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_a_metrics_key_reads_metrics_and_nothing_else(state: AppState) -> None:
    async with client_for(state, api_keys=["api"], metrics_key=SecretStr("scrape")) as http:
        assert (await http.get("/metrics")).status_code == 401
        assert (await http.get("/metrics", headers=bearer("nope"))).status_code == 401
        assert (await http.get("/metrics", headers=bearer("scrape"))).status_code == 200
        assert (await http.get("/metrics", headers=bearer("api"))).status_code == 200
        assert (await http.get("/v1/queues", headers=bearer("scrape"))).status_code == 401
        assert (await http.get("/v1/queues", headers=bearer("api"))).status_code == 200
    async with client_for(state, metrics_key=SecretStr("scrape")) as http:  # no API keys
        assert (await http.get("/v1/queues")).status_code == 200
        assert (await http.get("/metrics")).status_code == 401
        assert (await http.get("/metrics", headers=bearer("scrape"))).status_code == 200


async def test_open_metrics_need_no_key(state: AppState) -> None:
    async with client_for(state, api_keys=["api"], metrics_open=True) as http:
        assert (await http.get("/metrics")).status_code == 200
        assert (await http.get("/v1/queues")).status_code == 401
        spec = (await http.get("/openapi.json")).json()
        assert spec["paths"]["/metrics"]["get"]["security"] == []


def depth(text: str) -> dict[tuple[str, str], float]:
    return {
        (s.labels["type"], s.labels["state"]): s.value
        for family in text_string_to_metric_families(text)
        if family.name == "conveyor_queue_depth"
        for s in family.samples
    }


async def test_queue_depth_per_type_and_state(state: AppState) -> None:
    for i in range(3):
        await state.client.enqueue("echo", {"value": i})
    await state.client.enqueue("echo", {}, delay_s=60)
    await state.streams.ensure_group("echo")
    await state.redis.xreadgroup(GROUP, "probe", {state.keys.stream("echo"): ">"}, count=1)
    async with client_for(state) as http:
        text = (await http.get("/metrics")).text
    seen = depth(text)
    assert seen[("echo", "undelivered")] == 2
    assert seen[("echo", "pending")] == 1
    assert seen[("echo", "delayed")] == 1
    assert seen[("refuse", "undelivered")] == 0
    assert {t for t, _ in seen} == set(state.app.registry.types)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_queue_depth_is_read_once_per_cache_period(state: AppState) -> None:
    clock = Clock()
    reader = Backlog(state.streams, ["echo"], max_age_s=2.0, clock=clock)
    await asyncio.gather(*(reader.refresh() for _ in range(20)))  # many scrapers at once
    assert reader.reads == 1
    await state.client.enqueue("echo", {})
    clock.now += 1.0
    await reader.refresh()
    assert reader.reads == 1  # the cached reading is still young enough
    clock.now += 1.5
    await reader.refresh()
    assert reader.reads == 2


async def test_without_a_cache_each_scrape_reads_the_queue(state: AppState) -> None:
    async with client_for(state, metrics_cache=0.0) as http:
        before = depth((await http.get("/metrics")).text)[("echo", "undelivered")]
        await state.client.enqueue("echo", {})
        after = depth((await http.get("/metrics")).text)[("echo", "undelivered")]
    assert after == before + 1


def gauge(text: str, name: str) -> dict[str, float]:
    return {s.labels["type"]: s.value for family in text_string_to_metric_families(text)
            if family.name == name for s in family.samples}


async def test_lag_counts_undelivered_and_pending_and_the_oldest_age_is_the_first_waiting(
    state: AppState,
) -> None:
    await state.streams.ensure_group("echo")
    for i in range(3):
        await state.client.enqueue("echo", {"value": i})
    await state.redis.xreadgroup(GROUP, "probe", {state.keys.stream("echo"): ">"}, count=1)
    reader = Backlog(state.streams, ["echo", "refuse"], max_age_s=0)
    await reader.refresh()
    text = generate_latest().decode()
    assert gauge(text, "conveyor_queue_lag") == {"echo": 3, "refuse": 0}
    first = gauge(text, "conveyor_queue_oldest_age_seconds")
    assert first["refuse"] == 0
    await asyncio.sleep(0.3)
    await reader.refresh()
    later = gauge(generate_latest().decode(), "conveyor_queue_oldest_age_seconds")
    assert later["echo"] >= first["echo"] + 0.29  # the second message still waits (ms clock)
    await state.redis.xreadgroup(GROUP, "probe", {state.keys.stream("echo"): ">"}, count=2)
    await reader.refresh()
    drained = gauge(generate_latest().decode(), "conveyor_queue_oldest_age_seconds")
    assert drained["echo"] == 0  # nothing undelivered
