"""A user's own route mounted on the Conveyor API, enqueueing inside its own transaction
(examples/shop.py)."""

from __future__ import annotations

import asyncio
import ipaddress
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
from examples import shop

from conveyor.api.app import create_app
from conveyor.config import DEV_WEBHOOK_SECRET, Settings
from conveyor.cron.relay import Relay
from conveyor.runtime.shutdown import Shutdown
from conveyor.state import AppState, open_state
from conveyor.worker.worker import Worker
from tests.conftest import eventually, judge
from tests.receiver import Receiver, serve_receiver


@pytest.fixture
async def shop_state(settings: Settings) -> AsyncIterator[AppState]:
    # The test's receiver listens on loopback, which the egress guard refuses by default.
    loopback = settings.model_copy(
        update={"webhook_allow_cidrs": [ipaddress.ip_network("127.0.0.1/32")]})
    async with open_state(loopback, shop.app) as state:
        yield state


@pytest.fixture
async def running(shop_state: AppState) -> AsyncIterator[httpx.AsyncClient]:
    """API, a worker, and the relay (which publishes tasks enqueued in user transactions)."""
    stop = Shutdown(10)
    relay = Relay(shop_state.redis, shop_state.keys, shop_state.streams, shop_state.store,
                  ["webhook"], liveness=judge(shop_state),
                  interval_s=60, grace_s=60, ttl_s=3)  # the scan stays out of it
    services = [asyncio.create_task(Worker(shop_state, types=["webhook"]).run(stop)),
                asyncio.create_task(relay.run(stop))]
    transport = httpx.ASGITransport(app=create_app(shop_state))
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
        yield http
    stop.begin()
    await asyncio.gather(*services)


async def test_order_and_its_task_commit_together(
    running: httpx.AsyncClient, shop_state: AppState
) -> None:
    item = f"book-{uuid.uuid4().hex[:8]}"
    async with serve_receiver(Receiver(DEV_WEBHOOK_SECRET)) as (hook, url):
        placed = await running.post("/shop/orders", json={
            "item": item, "quantity": 2, "notify_url": url})
        assert placed.status_code == 201, placed.text
        task_id = placed.json()["task"]

        async def delivered() -> bool:
            task = (await running.get(f"/v1/tasks/{task_id}")).json()
            return bool(task["status"] == "succeeded")

        await eventually(delivered)
        assert hook.received[0]["body"] == {"order": placed.json()["order"], "item": item,
                                            "quantity": 2}
    stored = await shop_state.pool.fetchval(
        "SELECT task_id FROM public.shop_orders WHERE item = $1", item)
    assert str(stored) == task_id


async def test_a_rolled_back_order_leaves_no_task_and_no_message(
    running: httpx.AsyncClient, shop_state: AppState
) -> None:
    item = f"pen-{uuid.uuid4().hex[:8]}"
    refused = await running.post("/shop/orders", json={
        "item": item, "quantity": 0, "notify_url": "http://127.0.0.1:8009/hook"})
    assert refused.status_code == 422
    assert refused.headers["content-type"] == "application/problem+json"
    await asyncio.sleep(0.5)  # time for a NOTIFY to arrive, were there one
    orders = await shop_state.pool.fetchval(
        "SELECT count(*) FROM public.shop_orders WHERE item = $1", item)
    tasks = await shop_state.pool.fetchval(f"SELECT count(*) FROM {shop_state.store.table}")
    assert (orders, tasks) == (0, 0)
    assert await shop_state.redis.xlen(shop_state.keys.stream("webhook")) == 0


async def test_user_routes_are_in_the_openapi_document(running: httpx.AsyncClient) -> None:
    spec = (await running.get("/openapi.json")).json()
    assert "/shop/orders" in spec["paths"]


async def test_a_misspelt_field_is_refused_not_dropped(shop_state: AppState) -> None:
    transport = httpx.ASGITransport(app=create_app(shop_state))
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
        order = await http.post("/shop/orders", json={
            "item": "book", "quantity": 2, "notify_url": "https://example.com/hook",
            "gift_wrap": True})
        assert order.status_code == 422
        assert order.json()["errors"][0]["path"] == "gift_wrap"
        hook = await http.post("/v1/tasks", json={"type": "webhook", "payload": {
            "url": "https://example.com/hook", "bdy": {"order": 7}}})
        assert hook.status_code == 422
        assert hook.json()["errors"][0]["path"] == "payload.bdy"
        thumb = await http.post("/v1/tasks", json={"type": "thumbnail", "payload": {
            "image_base64": "", "width": 1, "height": 1, "quality": 90}})
        assert thumb.status_code == 422
        assert "payload.quality" in [e["path"] for e in thumb.json()["errors"]]
    count = await shop_state.pool.fetchval(f"SELECT count(*) FROM {shop_state.store.table}")
    assert count == 0
