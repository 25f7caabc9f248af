"""API keys against real Postgres and Redis: every scope boundary, revoked, expired and unknown
keys, bootstrap keys, the open mode, per-key rate limits and their documentation."""

from __future__ import annotations

import base64
import dataclasses
import io
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from fastapi import APIRouter
from PIL import Image

from conveyor import tasks as builtin
from conveyor.api.app import create_app
from conveyor.application import Conveyor
from conveyor.config import Rate, Settings
from conveyor.state import AppState, open_state
from conveyor.store.keys import KeyStore
from conveyor.testing.servers import PostgresServer, RedisServer
from tests.conftest import make_settings

PROBLEM = "application/problem+json"
Http = Callable[..., httpx.AsyncClient]


def keys_of(state: AppState) -> KeyStore:
    return KeyStore(state.pool, state.settings.database_schema)


def http_for(state: AppState, **settings: Any) -> httpx.AsyncClient:
    changed = state.settings.model_copy(update=settings) if settings else state.settings
    app = create_app(dataclasses.replace(state, settings=changed))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def make_key(state: AppState, scopes: list[str], **kwargs: Any) -> str:
    _, key = await keys_of(state).create(f"k-{uuid.uuid4().hex[:8]}", scopes, **kwargs)
    return key


def assert_problem(response: httpx.Response, status: int, *needles: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body: dict[str, Any] = response.json()
    for needle in needles:
        assert needle in body["detail"], body
    return body


ECHO = {"type": "echo", "payload": {"value": 1}}


async def test_a_read_key_reads_but_cannot_enqueue_cancel_or_list_keys(state: AppState) -> None:
    reader = await make_key(state, ["tasks:read"])
    admin = await make_key(state, ["admin"])
    async with http_for(state) as http:
        created = await http.post("/v1/tasks", json=ECHO, headers=auth(admin))
        assert created.status_code == 202
        task_id = created.json()["id"]
        assert (await http.get(f"/v1/tasks/{task_id}", headers=auth(reader))).status_code == 200
        for path in ("/v1/tasks", "/v1/workers", "/v1/queues", "/v1/queues/echo/dead-letters",
                     "/metrics"):
            assert (await http.get(path, headers=auth(reader))).status_code == 200, path
        refused = await http.post("/v1/tasks", json=ECHO, headers=auth(reader))
        assert assert_problem(refused, 403, "tasks:enqueue")["scope"] == "tasks:enqueue"
        batch = await http.post("/v1/tasks/batch", json={"tasks": [ECHO]}, headers=auth(reader))
        assert_problem(batch, 403, "tasks:enqueue")
        # Refused before the body is looked at: an invalid one is still a 403.
        invalid = await http.post("/v1/tasks", json={"type": "echo"}, headers=auth(reader))
        assert_problem(invalid, 403, "tasks:enqueue")
        cancel = await http.post(f"/v1/tasks/{task_id}/cancel", headers=auth(reader))
        assert_problem(cancel, 403, "tasks:manage")
        keys = await http.get("/v1/keys", headers=auth(reader))
        assert_problem(keys, 403, "admin")


async def test_manage_is_needed_to_cancel_and_retry(state: AppState) -> None:
    enqueuer = await make_key(state, ["tasks:enqueue"])
    manager = await make_key(state, ["tasks:manage"])
    async with http_for(state) as http:
        created = await http.post("/v1/tasks", json=ECHO, headers=auth(enqueuer))
        assert created.status_code == 202
        task_id = created.json()["id"]
        assert_problem(await http.get(f"/v1/tasks/{task_id}", headers=auth(enqueuer)), 403,
                       "tasks:read")
        assert_problem(await http.post(f"/v1/tasks/{task_id}/cancel", headers=auth(enqueuer)),
                       403, "tasks:manage")
        cancelled = await http.post(f"/v1/tasks/{task_id}/cancel", headers=auth(manager))
        assert cancelled.status_code == 200
        assert cancelled.json()["status"] == "cancelled"
        assert_problem(await http.post(f"/v1/tasks/{task_id}/retry", headers=auth(enqueuer)),
                       403, "tasks:manage")
        retried = await http.post(f"/v1/tasks/{task_id}/retry", headers=auth(manager))
        assert retried.json()["status"] == "queued"
        assert_problem(await http.post("/v1/tasks", json=ECHO, headers=auth(manager)), 403,
                       "tasks:enqueue")


@pytest.fixture
async def builtin_state(
    postgres: PostgresServer, redis_server: RedisServer
) -> AsyncIterator[AppState]:
    """State over the built-in app (`webhook`, `thumbnail`)."""
    settings = make_settings(postgres, redis_server.url)
    async with open_state(settings, builtin.app) as opened:
        yield opened
        await opened.pool.execute(f"DROP SCHEMA {settings.database_schema} CASCADE")


def _thumbnail() -> dict[str, Any]:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, "PNG")
    return {"type": "thumbnail", "payload": {
        "image_base64": base64.b64encode(buffer.getvalue()).decode(), "width": 2, "height": 2}}


async def test_a_key_for_webhook_cannot_enqueue_thumbnail(builtin_state: AppState) -> None:
    state = builtin_state
    webhooks = await make_key(state, ["tasks:enqueue"], types=["webhook"])
    webhook = {"type": "webhook", "payload": {"url": "https://example.com/hook"}}
    async with http_for(state) as http:
        assert (await http.post("/v1/tasks", json=webhook, headers=auth(webhooks))
                ).status_code == 202
        refused = await http.post("/v1/tasks", json=_thumbnail(), headers=auth(webhooks))
        assert assert_problem(refused, 403, "thumbnail")["types"] == ["thumbnail"]
        batch = await http.post("/v1/tasks/batch", json={"tasks": [webhook, _thumbnail()]},
                                headers=auth(webhooks))
        assert assert_problem(batch, 403, "thumbnail")["types"] == ["thumbnail"]
        rows = await state.pool.fetchval(f"SELECT count(*) FROM {state.store.table}")
        assert rows == 1  # the refused batch stored nothing


async def test_revoked_expired_and_unknown_keys_are_401(state: AppState) -> None:
    store = keys_of(state)
    _, revoked = await store.create("gone", ["admin"])
    await store.revoke("gone")
    _, expired = await store.create("old", ["admin"], expires_in_s=60)
    await state.pool.execute(f"UPDATE {store.table} SET expires_at = now() - interval '1 s' "
                             "WHERE name = 'old'")
    live = await make_key(state, ["admin"])
    forged = live[:-4] + ("AAAA" if not live.endswith("AAAA") else "BBBB")
    async with http_for(state) as http:
        body = assert_problem(await http.get("/v1/tasks", headers=auth(revoked)), 401,
                              "revoked")
        assert "'gone'" in body["detail"]
        assert_problem(await http.get("/v1/tasks", headers=auth(expired)), 401, "expired")
        unknown = await http.get("/v1/tasks", headers=auth(forged))
        assert_problem(unknown, 401, "unknown API key")
        assert unknown.headers["www-authenticate"] == "Bearer"
        assert_problem(await http.get("/v1/tasks"), 401, "Authorization: Bearer")
        assert_problem(await http.get("/v1/tasks", headers=auth("cvk_nonsense")), 401)
        assert (await http.get("/v1/tasks", headers=auth(live))).status_code == 200
        for path in ("/healthz", "/readyz", "/docs", "/openapi.json"):
            assert (await http.get(path)).status_code == 200, path


async def test_revoking_takes_effect_within_the_cache_time(state: AppState) -> None:
    store = keys_of(state)
    _, key = await store.create("soon-gone", ["tasks:read"])
    async with http_for(state, api_key_cache=0.0) as http:
        assert (await http.get("/v1/tasks", headers=auth(key))).status_code == 200
        await store.revoke("soon-gone")
        assert_problem(await http.get("/v1/tasks", headers=auth(key)), 401, "revoked")


async def test_the_admin_lists_and_revokes_keys_over_http(state: AppState) -> None:
    admin = await make_key(state, ["admin"])
    _, victim = await keys_of(state).create("victim", ["tasks:read"], rate=Rate(5, 60))
    async with http_for(state) as http:
        assert (await http.get("/v1/tasks", headers=auth(victim))).status_code == 200
        listed = (await http.get("/v1/keys", headers=auth(admin))).json()["keys"]
        by_name = {k["name"]: k for k in listed}
        assert by_name["victim"]["state"] == "active"
        assert by_name["victim"]["rate"] == "5/m"
        assert victim.startswith(by_name["victim"]["prefix"])
        assert by_name["victim"]["last_used_at"] is not None
        assert victim.split("_", 2)[2] not in str(listed)  # the secret may hold "_"
        revoked = await http.post("/v1/keys/victim/revoke", headers=auth(admin))
        assert revoked.json()["state"] == "revoked"
        # This process forgets the key at once; others within API_KEY_CACHE.
        assert_problem(await http.get("/v1/tasks", headers=auth(victim)), 401, "revoked")
        missing = await http.post("/v1/keys/nobody/revoke", headers=auth(admin))
        assert_problem(missing, 404, "nobody")


async def test_bootstrap_keys_are_admin_and_table_keys_work_beside_them(
    state: AppState,
) -> None:
    table_key = await make_key(state, ["tasks:read"])
    async with http_for(state, api_keys=["s3cret", "other"]) as http:
        assert (await http.post("/v1/tasks", json=ECHO, headers=auth("other"))
                ).status_code == 202
        assert (await http.get("/v1/keys", headers=auth("s3cret"))).status_code == 200
        assert (await http.get("/v1/tasks", headers=auth(table_key))).status_code == 200
        assert_problem(await http.get("/v1/tasks", headers=auth("s3cre")), 401)
        assert_problem(await http.get("/v1/tasks"), 401)


async def test_without_any_key_loopback_is_open_and_elsewhere_closed(state: AppState) -> None:
    async with http_for(state) as http:  # 127.0.0.1, no keys: `make run`
        assert (await http.post("/v1/tasks", json=ECHO)).status_code == 202
    async with http_for(state, host="0.0.0.0") as http:  # an in-process app: never bound
        assert_problem(await http.get("/v1/tasks"), 401, "no API keys are configured")
    async with http_for(state, host="0.0.0.0", allow_anonymous=True) as http:
        assert (await http.get("/v1/tasks")).status_code == 200
    # A key made while an API runs closes it (within API_KEY_CACHE).
    async with http_for(state, api_key_cache=0.0) as http:
        key = await make_key(state, ["tasks:read"])
        assert_problem(await http.get("/v1/tasks"), 401)
        assert (await http.get("/v1/tasks", headers=auth(key))).status_code == 200


async def test_an_applications_routes_need_tasks_read_unless_it_says_otherwise(
    state: AppState,
) -> None:
    mine, public = APIRouter(), APIRouter()

    @mine.get("/orders")
    async def orders() -> dict[str, int]:
        return {"orders": 0}

    @public.get("/status")
    async def status() -> dict[str, str]:
        return {"status": "fine"}

    conveyor = Conveyor()
    conveyor.registry = state.app.registry
    conveyor.include_router(mine, prefix="/shop")
    conveyor.include_router(public, prefix="/shop", scope=None)
    enqueuer = await make_key(state, ["tasks:enqueue"])
    reader = await make_key(state, ["tasks:read"])
    app = create_app(dataclasses.replace(state, app=conveyor))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://test") as http:
        assert_problem(await http.get("/shop/orders"), 401)
        assert_problem(await http.get("/shop/orders", headers=auth(enqueuer)), 403,
                       "tasks:read")
        assert (await http.get("/shop/orders", headers=auth(reader))).status_code == 200
        assert (await http.get("/shop/status")).status_code == 200
        spec = (await http.get("/openapi.json")).json()
    assert "403" in spec["paths"]["/shop/orders"]["get"]["responses"]
    assert spec["paths"]["/shop/status"]["get"]["security"] == []


async def test_metrics_take_the_metrics_key_or_a_read_key(state: AppState) -> None:
    from pydantic import SecretStr

    reader = await make_key(state, ["tasks:read"])
    enqueuer = await make_key(state, ["tasks:enqueue"])
    async with http_for(state, metrics_key=SecretStr("scrape")) as http:
        assert (await http.get("/metrics", headers=auth("scrape"))).status_code == 200
        assert (await http.get("/metrics", headers=auth(reader))).status_code == 200
        assert_problem(await http.get("/metrics", headers=auth(enqueuer)), 403, "tasks:read")
        assert_problem(await http.get("/metrics"), 401)
        # The metrics key opens nothing else.
        assert_problem(await http.get("/v1/tasks", headers=auth("scrape")), 401)


async def test_only_a_metrics_key_still_guards_metrics(state: AppState) -> None:
    from pydantic import SecretStr

    async with http_for(state, metrics_key=SecretStr("scrape")) as http:  # no API key at all
        assert (await http.get("/metrics", headers=auth("scrape"))).status_code == 200
        assert_problem(await http.get("/metrics"), 401)
        assert_problem(await http.get("/metrics", headers=auth("wrong")), 401)
        assert (await http.get("/v1/tasks")).status_code == 200  # the API itself stays open


async def test_a_keys_rate_is_enforced_with_retry_after(state: AppState) -> None:
    key = await make_key(state, ["tasks:read"], rate=Rate(3, 3600))
    other = await make_key(state, ["tasks:read"])
    async with http_for(state) as http:
        codes = [(await http.get("/v1/tasks", headers=auth(key))).status_code
                 for _ in range(5)]
        assert codes == [200, 200, 200, 429, 429]
        limited = await http.get("/v1/tasks", headers=auth(key))
        body = assert_problem(limited, 429, "rate limit")
        assert body["status"] == 429
        # One request per 1200 s comes back: the first is due 1200 s after the burst.
        assert 1100 <= int(limited.headers["retry-after"]) <= 1200
        # Other keys have their own allowance; without a default they have no limit.
        assert all([(await http.get("/v1/tasks", headers=auth(other))).status_code == 200
                    for _ in range(5)])


async def test_the_default_rate_applies_to_every_key_without_its_own(state: AppState) -> None:
    own = await make_key(state, ["tasks:read"], rate=Rate(10, 3600))
    plain = await make_key(state, ["tasks:read"])
    async with http_for(state, api_keys=["boot"], api_rate_limit=Rate(2, 3600)) as http:
        for key, allowed in ((plain, 2), ("boot", 2), (own, 10)):
            codes = [(await http.get("/v1/tasks", headers=auth(key))).status_code
                     for _ in range(allowed + 1)]
            assert codes == [200] * allowed + [429], key


async def test_the_limit_fails_open_when_redis_is_down(
    postgres: PostgresServer, own_redis: RedisServer
) -> None:
    settings: Settings = make_settings(postgres, own_redis.url, api_rate_limit=Rate(1, 3600))
    from tests.apps import basic

    async with open_state(settings, basic.app) as state:
        key = await make_key(state, ["tasks:read"])
        async with http_for(state) as http:
            assert (await http.get("/v1/tasks", headers=auth(key))).status_code == 200
            assert (await http.get("/v1/tasks", headers=auth(key))).status_code == 429
            own_redis.stop()
            # Listing reads Postgres only: it goes on, unlimited, while Redis is away.
            for _ in range(3):
                assert (await http.get("/v1/tasks", headers=auth(key))).status_code == 200
        await state.pool.execute(f"DROP SCHEMA {settings.database_schema} CASCADE")


async def test_the_openapi_document_shows_401_403_and_429_per_route(state: AppState) -> None:
    async with http_for(state) as http:
        spec = (await http.get("/openapi.json")).json()
    paths = spec["paths"]
    expected = {("/v1/tasks", "post"): "tasks:enqueue", ("/v1/tasks", "get"): "tasks:read",
                ("/v1/tasks/{task_id}/cancel", "post"): "tasks:manage",
                ("/v1/keys", "get"): "admin", ("/v1/workers", "get"): "tasks:read"}
    for (path, method), scope in expected.items():
        responses = paths[path][method]["responses"]
        assert {"401", "403", "429"} <= set(responses), path
        assert scope in responses["403"]["description"], path
        assert paths[path][method]["security"] == [{"bearer": []}]
    assert "401" not in paths["/healthz"]["get"]["responses"]


async def test_with_postgres_down_keys_seen_before_still_work(
    own_postgres: PostgresServer, redis_server: RedisServer
) -> None:
    from tests.apps import basic

    settings = make_settings(own_postgres, redis_server.url, api_key_cache=0.0)
    async with open_state(settings, basic.app) as state:
        seen = await make_key(state, ["tasks:read"])
        unseen = await make_key(state, ["tasks:read"])
        async with http_for(state) as http:
            assert (await http.get("/v1/queues", headers=auth(seen))).status_code == 200
            own_postgres.stop()
            # Every look-up fails now; the key read a moment ago is served as it was.
            # (/v1/queues reads Postgres too: 503, but past the key.)
            assert (await http.get("/metrics", headers=auth(seen))).status_code == 200
            assert_problem(await http.get("/v1/queues", headers=auth(unseen)), 503)



async def test_every_route_of_the_app_needs_a_key_but_the_open_ones(state: AppState) -> None:
    """Walks the app's OpenAPI paths, so a route added later without a scope fails here."""
    await make_key(state, ["tasks:read"])
    app = create_app(state)
    open_paths = {"/healthz", "/readyz", "/openapi.json"}
    seen: list[tuple[str, str]] = []
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://test") as http:
        assert (await http.get("/docs")).status_code == 200
        for path, operations in app.openapi()["paths"].items():
            concrete = path.replace("{task_id}", str(uuid.uuid4())).replace(
                "{name}", "k").replace("{task_type}", "echo")
            for method in operations:
                response = await http.request(method.upper(), concrete, json={})
                seen.append((method, path))
                if path in open_paths:
                    assert response.status_code != 401, (method, path)
                else:
                    assert_problem(response, 401)
    assert ("post", "/v1/keys/{name}/revoke") in seen
    assert ("get", "/metrics") in seen


async def test_revoking_or_outliving_every_key_does_not_reopen_the_api(state: AppState) -> None:
    # On loopback (behind a proxy on the same host, say), the API is open only until a key is
    # made: once the last key is revoked or has expired, a request without any key must not
    # become an anonymous admin.
    store = keys_of(state)
    _, key = await store.create("only", ["admin"])
    async with http_for(state, api_key_cache=0.0) as http:
        assert (await http.get("/v1/keys", headers=auth(key))).status_code == 200
        await store.revoke("only")
        assert_problem(await http.get("/v1/keys"), 401)
        assert_problem(await http.post("/v1/tasks", json=ECHO), 401)
    _, lapsing = await store.create("lapsing", ["admin"], expires_in_s=60)
    await state.pool.execute(f"UPDATE {store.table} SET expires_at = now() - interval '1 s'")
    async with http_for(state, api_key_cache=0.0) as http:
        assert_problem(await http.get("/v1/tasks"), 401)
        assert_problem(await http.get("/v1/tasks", headers=auth(lapsing)), 401, "expired")
