"""The built-in `webhook` type under the egress guard, end to end: refused at enqueue when
the URL shows it, refused at connect (the task ends dead, naming the address) otherwise.
Receivers listen on 127.0.0.1 only; refused destinations are never dialled."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from conveyor.api.app import create_app
from conveyor.config import Settings
from conveyor.egress.client import OutboundHttp
from conveyor.egress.policy import EgressPolicy, IPAddress
from conveyor.runtime.shutdown import Shutdown
from conveyor.state import AppState, open_state
from conveyor.tasks import app as builtin
from conveyor.worker.worker import Worker
from tests.conftest import eventually
from tests.receiver import Answer, Receiver, serve_receiver

SECRET = "test-webhook-secret"
LOOPBACK = ipaddress.IPv4Network("127.0.0.1/32")


async def to_loopback(host: str, port: int) -> list[IPAddress]:
    """A resolver under which every name is 127.0.0.1 (as a hostile DNS answer would be)."""
    return [ipaddress.ip_address("127.0.0.1")]


@contextlib.asynccontextmanager
async def serving(
    settings: Settings, *, allow: list[ipaddress.IPv4Network], worker_http: OutboundHttp,
) -> AsyncIterator[tuple[httpx.AsyncClient, AppState]]:
    """The API (checking at enqueue under `allow`) and a worker sending with `worker_http`."""
    configured = settings.model_copy(update={"webhook_secret": SecretStr(SECRET),
                                             "webhook_allow_cidrs": allow})
    async with open_state(configured, builtin) as state:
        stop = Shutdown(10)
        worker = Worker(state, types=["webhook"], http=worker_http)
        task = asyncio.create_task(worker.run(stop))
        transport = httpx.ASGITransport(app=create_app(state))
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
                yield http, state
        finally:
            stop.begin()
            await task


async def final(http: httpx.AsyncClient, task_id: str) -> dict[str, Any]:
    body: dict[str, Any] = {}

    async def finished() -> bool:
        nonlocal body
        body = (await http.get(f"/v1/tasks/{task_id}")).json()
        return body["status"] in ("succeeded", "dead")

    await eventually(finished, 20)
    return body


async def deliver(http: httpx.AsyncClient, url: str) -> dict[str, Any]:
    created = await http.post("/v1/tasks", json={"type": "webhook", "payload": {"url": url}})
    assert created.status_code == 202, created.text
    return await final(http, created.json()["id"])


@pytest.mark.parametrize("allow", [[], [LOOPBACK]], ids=["default", "allowed"])
async def test_a_receiver_on_loopback_is_reached_only_if_an_allow_range_covers_it(
    settings: Settings, allow: list[ipaddress.IPv4Network],
) -> None:
    worker_http = OutboundHttp(EgressPolicy(tuple(allow)), resolver=to_loopback)
    async with serve_receiver(Receiver(SECRET)) as (hook, url), \
            serving(settings, allow=allow, worker_http=worker_http) as (http, _):
        named = url.replace("127.0.0.1", "receiver.example")  # resolves to 127.0.0.1
        task = await deliver(http, named)
    if allow:
        assert task["status"] == "succeeded"
        assert len(hook.received) == 1
    else:
        assert task["status"] == "dead"
        assert task["attempts"] == 1  # a refused destination is not retried
        assert "receiver.example" in task["last_error"]
        assert "it resolves to 127.0.0.1; 127.0.0.1 is loopback" in task["last_error"]
        assert hook.received == []


@pytest.mark.parametrize(("url", "named"), [
    ("http://127.0.0.1:8080/hook", "127.0.0.1 is loopback (127.0.0.0/8)"),
    ("http://localhost:8080/hook", "localhost names the loopback interface"),
    ("http://api.localhost:8080/hook", "api.localhost names the loopback interface"),
    ("http://[::ffff:127.0.0.1]:8080/hook", "::ffff:7f00:1 (127.0.0.1) is loopback"),
    ("http://2130706433:8080/hook", "127.0.0.1 is loopback"),
    ("http://0x7f000001:8080/hook", "127.0.0.1 is loopback"),
    ("http://0.0.0.0:8080/hook", "0.0.0.0 is 'this network'"),
    ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is a cloud metadata"),
    ("http://[fd00:ec2::254]/latest/meta-data/", "fd00:ec2::254 is a cloud metadata"),
    ("http://10.1.2.3/hook", "10.1.2.3 is private (10.0.0.0/8)"),
    ("http://example.com:5432/hook", "port 5432 is PostgreSQL's"),
    ("http://example.com:6379/hook", "port 6379 is Redis's"),
    ("http://example.com:22/hook", "port 22 is a system service port"),
])
async def test_a_denied_destination_in_the_url_is_refused_at_enqueue(
    settings: Settings, url: str, named: str,
) -> None:
    async with serving(settings, allow=[], worker_http=OutboundHttp()) as (http, state):
        refused = await http.post("/v1/tasks", json={"type": "webhook",
                                                     "payload": {"url": url}})
        count = await state.pool.fetchval(f"SELECT count(*) FROM {state.store.table}")
    assert refused.status_code == 422, refused.text
    assert refused.headers["content-type"].startswith("application/problem+json")
    error = refused.json()["errors"][0]
    assert error["path"] == "payload.url"
    assert "destination refused" in error["message"]
    assert named in error["message"]
    assert count == 0


@pytest.mark.parametrize("host", ["127.0.0.1", "[::ffff:127.0.0.1]"])
async def test_the_worker_refuses_at_connect_what_the_enqueue_check_let_through(
    settings: Settings, host: str,
) -> None:
    # The API allows loopback, this worker does not: its transport has the last word.
    async with serve_receiver(Receiver(SECRET)) as (hook, url), \
            serving(settings, allow=[LOOPBACK], worker_http=OutboundHttp()) as (http, _):
        task = await deliver(http, url.replace("127.0.0.1", host))
    assert task["status"] == "dead"
    assert task["attempts"] == 1
    assert "127.0.0.1) is loopback" in task["last_error"] or (
        "127.0.0.1 is loopback" in task["last_error"])
    assert hook.received == []


async def test_a_redirect_to_a_denied_address_is_not_followed(settings: Settings) -> None:
    metadata = "http://169.254.169.254/latest/meta-data/"
    loopback_only = OutboundHttp(EgressPolicy((LOOPBACK,)))
    async with serve_receiver(Receiver(SECRET, statuses=[302], location=metadata)) \
            as (hook, url), \
            serving(settings, allow=[LOOPBACK], worker_http=loopback_only) as (http, _):
        task = await deliver(http, url)
    assert task["status"] == "dead"
    assert task["attempts"] == 1
    assert "receiver answered 302, a redirect, which is not followed" in task["last_error"]
    assert metadata in task["last_error"]
    assert len(hook.received) == 1


async def test_a_big_answer_is_read_to_64_kib_and_kept_as_an_excerpt(
    settings: Settings,
) -> None:
    loopback_only = OutboundHttp(EgressPolicy((LOOPBACK,)))
    async with serve_receiver(Answer(status=400, size=4 * 1024 * 1024)) as (answer, url), \
            serving(settings, allow=[LOOPBACK], worker_http=loopback_only) as (http, _):
        task = await deliver(http, url)
    assert task["status"] == "dead"
    assert len(answer.hosts) == 1
    assert task["last_error"].endswith("receiver answered 400: " + "x" * 200)
