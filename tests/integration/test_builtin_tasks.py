"""The built-in app's two task types end to end: HTTP → Postgres → Redis → worker → Postgres."""

from __future__ import annotations

import asyncio
import base64
import io
import ipaddress
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import structlog
from PIL import Image

from conveyor.api.app import create_app
from conveyor.config import Settings
from conveyor.runtime.shutdown import Shutdown
from conveyor.state import AppState, open_state
from conveyor.tasks import app as builtin
from conveyor.worker.worker import Worker
from tests.conftest import eventually
from tests.receiver import Receiver, serve_receiver

SECRET = "test-webhook-secret"


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    async with serve_receiver(Receiver(SECRET)) as running:
        yield running


@pytest.fixture
async def builtin_state(settings: Settings) -> AsyncIterator[AppState]:
    from pydantic import SecretStr

    # The test's receiver listens on loopback, which the egress guard refuses by default.
    configured = settings.model_copy(update={
        "webhook_secret": SecretStr(SECRET),
        "webhook_allow_cidrs": [ipaddress.ip_network("127.0.0.1/32")]})
    async with open_state(configured, builtin) as state:
        yield state


@pytest.fixture
async def running(builtin_state: AppState) -> AsyncIterator[httpx.AsyncClient]:
    worker = Worker(builtin_state)
    stop = Shutdown(10)
    task = asyncio.create_task(worker.run(stop))
    transport = httpx.ASGITransport(app=create_app(builtin_state))
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
        yield http
    stop.begin()
    await task


async def final(http: httpx.AsyncClient, task_id: str, timeout_s: float = 20) -> dict[str, Any]:
    body: dict[str, Any] = {}

    async def finished() -> bool:
        nonlocal body
        body = (await http.get(f"/v1/tasks/{task_id}")).json()
        return body["status"] in ("succeeded", "dead")

    await eventually(finished, timeout_s)
    return body


async def test_webhook_is_delivered_signed(
    running: httpx.AsyncClient, receiver: tuple[Receiver, str]
) -> None:
    hook, url = receiver
    created = await running.post("/v1/tasks", json={
        "type": "webhook", "payload": {"url": url, "body": {"order": 7}}})
    assert created.status_code == 202
    task = await final(running, created.json()["id"])
    assert task["status"] == "succeeded"
    assert task["result"]["status_code"] == 200
    assert hook.received == [{"body": {"order": 7}, "valid": True, "task_id": task["id"]}]


async def test_webhook_retries_5xx_and_gives_up_on_4xx(
    running: httpx.AsyncClient, receiver: tuple[Receiver, str], builtin_state: AppState
) -> None:
    hook, url = receiver
    hook.statuses = [503, 500]
    retried = (await running.post("/v1/tasks", json={
        "type": "webhook", "payload": {"url": url}})).json()
    # The built-in type waits 2 s then 4 s between attempts; make them due now.
    async def hurry() -> bool:
        await builtin_state.redis.zadd(builtin_state.keys.delayed("webhook"),
                                       {retried["id"]: 0}, xx=True)
        await builtin_state.pool.execute(
            f"UPDATE {builtin_state.store.table} SET run_at = now() WHERE id = $1"
            " AND status = 'queued'", retried["id"])
        body = (await running.get(f"/v1/tasks/{retried['id']}")).json()
        return bool(body["status"] == "succeeded")

    await eventually(hurry, timeout_s=20, interval_s=0.1)
    task = await final(running, retried["id"])
    assert task["attempts"] == 3
    assert len(hook.received) == 3

    hook.statuses = [404]
    refused = (await running.post("/v1/tasks", json={
        "type": "webhook", "payload": {"url": url}})).json()
    task = await final(running, refused["id"])
    assert task["status"] == "dead"
    assert task["attempts"] == 1
    assert "receiver answered 404" in task["last_error"]


def png(width: int, height: int) -> str:
    image = Image.new("RGB", (width, height), (200, 30, 30))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


async def test_thumbnail_is_made_in_a_process_pool(running: httpx.AsyncClient) -> None:
    created = await running.post("/v1/tasks", json={
        "type": "thumbnail", "payload": {"image_base64": png(640, 480), "width": 64,
                                         "height": 64}})
    assert created.status_code == 202
    task = await final(running, created.json()["id"], timeout_s=40)
    assert task["status"] == "succeeded", task["last_error"]
    result = task["result"]
    assert (result["width"], result["height"]) == (64, 48)
    assert result["source"] == {"width": 640, "height": 480, "format": "PNG"}
    thumb = Image.open(io.BytesIO(base64.b64decode(result["png_base64"])))
    assert thumb.size == (64, 48)
    assert result["bytes"] == len(base64.b64decode(result["png_base64"]))


async def test_thumbnail_rejects_bad_input_before_it_is_stored(
    running: httpx.AsyncClient, builtin_state: AppState
) -> None:
    bad = await running.post("/v1/tasks", json={
        "type": "thumbnail", "payload": {"image_base64": "%%%", "width": 64, "height": 64}})
    assert bad.status_code == 422
    assert bad.json()["errors"][0]["path"] == "payload.image_base64"
    huge = await running.post("/v1/tasks", json={
        "type": "thumbnail", "payload": {"image_base64": png(2, 2), "width": 5000,
                                         "height": 64}})
    assert huge.status_code == 422
    count = await builtin_state.pool.fetchval(
        f"SELECT count(*) FROM {builtin_state.store.table}")
    assert count == 0


async def test_a_webhook_worker_warns_at_start_of_the_development_secret(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pydantic import SecretStr
    from structlog.testing import capture_logs

    from conveyor import cli
    from conveyor.config import DEV_WEBHOOK_SECRET
    from conveyor.tasks import webhook

    monkeypatch.setattr(webhook, "log", structlog.get_logger("conveyor.webhook"))
    development = settings.model_copy(update={"webhook_secret": SecretStr(DEV_WEBHOOK_SECRET)})
    async with open_state(development, builtin) as state:
        with capture_logs() as logs:
            services = cli.build_services(state, cli.Roles(api=True, cron=True))
            assert not [e for e in logs if e["event"] == "webhook.secret.development"]
            services = cli.build_services(state, cli.Roles(worker=True))
        warned = [e for e in logs if e["event"] == "webhook.secret.development"]
        assert [e["log_level"] for e in warned] == ["warning"]
        for service in services:
            if isinstance(service, Worker):
                service.executor.close()
