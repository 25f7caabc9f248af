"""The dashboard over HTTP (in process, real Postgres and Redis): the open mode, signing in
with a key, CSRF, security headers, every page, filter errors and safe redirects. (The real
browser's tests are in tests/browser/.)"""

from __future__ import annotations

import dataclasses
import re
import uuid
from typing import Any

import httpx

from conveyor.api.app import create_app
from conveyor.client import TaskRequest
from conveyor.state import AppState
from conveyor.store.keys import KeyStore


def http_for(state: AppState, **settings: Any) -> httpx.AsyncClient:
    changed = state.settings.model_copy(update=settings) if settings else state.settings
    app = create_app(dataclasses.replace(state, settings=changed))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', html)
    assert match, html
    return match[1]


async def test_open_on_loopback_with_every_page_and_its_headers(state: AppState) -> None:
    record = (await state.client.enqueue_many(
        [TaskRequest("echo", {"value": 42}, delay_s=3600)]))[0].record
    async with http_for(state) as http:
        first = await http.get("/ui")
        assert first.status_code == 200, first.text
        cookie = first.headers["set-cookie"]
        assert "conveyor_ui=" in cookie
        assert "HttpOnly" in cookie
        assert "SameSite=strict" in cookie
        csp = first.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp
        assert "script-src 'self'" in csp
        assert "unsafe-inline" not in csp
        assert first.headers["x-frame-options"] == "DENY"
        for path in ("/ui/tasks", "/ui/tasks?type=echo&status=queued",
                     "/ui/tasks?type=echo&field=payload.value+%3D+42", f"/ui/tasks/{record.id}",
                     f"/ui/tasks/{record.id}/body", f"/ui/tasks/{record.id}/copy",
                     "/ui/dead-letters", "/ui/dead-letters?type=doomed", "/ui/workers",
                     "/ui/workers/body", "/ui/cron", "/ui/queues", "/ui/overview/body",
                     "/ui/tasks/confirm?type=echo&action=cancel"):
            response = await http.get(path)
            assert response.status_code == 200, (path, response.text)
            assert response.headers["content-security-policy"] == csp
            assert "<script>" not in response.text, path
            assert " style=" not in response.text, path
        listed = await http.get("/ui/tasks?type=echo&field=payload.value+%3D+42")
        assert str(record.id) in listed.text
        confirm = await http.get("/ui/tasks/confirm?type=echo&action=cancel")
        assert 'data-count="1"' in confirm.text
        assert (await http.get("/ui/static/htmx.min.js")).status_code == 200
        assert (await http.get("/ui/static/README.md")).status_code == 404
        assert (await http.get("/openapi.json")).json()["paths"].keys().isdisjoint(
            {"/ui", "/ui/tasks"})


async def test_filter_errors_name_the_field(state: AppState) -> None:
    async with http_for(state) as http:
        cases = {
            "/ui/tasks?field=payload.x+%3D+1": "needs a type",
            "/ui/tasks?type=echo&field=nonsense": "payload.name = value",
            "/ui/tasks?status=lost": "status: 'lost'",
            "/ui/tasks?type=nope": "no task type is named 'nope'",
            "/ui/tasks?since=yesterday": "since: 'yesterday'",
            "/ui/tasks?id=123": "id: '123'",
        }
        for path, needle in cases.items():
            response = await http.get(path)
            assert response.status_code == 422, path
            assert needle in response.text.replace("&#39;", "'"), (path, response.text)
        found = await http.get(f"/ui/tasks?id={uuid.uuid4()}")
        assert found.status_code == 303
        assert (await http.get(found.headers["location"])).status_code == 404


async def test_actions_need_the_sessions_csrf_token(state: AppState) -> None:
    record = (await state.client.enqueue_many(
        [TaskRequest("echo", {"value": 1}, delay_s=3600)]))[0].record
    async with http_for(state) as http:
        page = await http.get(f"/ui/tasks/{record.id}")
        token = csrf_of(page.text)
        for form in ({}, {"csrf": "forged"}):
            refused = await http.post(f"/ui/tasks/{record.id}/cancel", data=form)
            assert refused.status_code == 403, refused.text
            assert "CSRF" in refused.json()["detail"]
        assert (await state.store.get(record.id)).status == "queued"  # type: ignore[union-attr]
        done = await http.post(f"/ui/tasks/{record.id}/cancel",
                               data={"csrf": token, "next": "https://elsewhere.example/"})
        assert done.status_code == 303
        assert done.headers["location"].startswith(f"/ui/tasks/{record.id}?notice=")
        assert (await state.store.get(record.id)).status == "cancelled"  # type: ignore[union-attr]
        bulk = await http.post("/ui/tasks/act", data={
            "csrf": token, "action": "delete", "id": [str(record.id)],
            "next": "https://elsewhere.example/ui"})
        assert bulk.status_code == 303
        assert bulk.headers["location"].startswith("/ui/tasks?notice=Deleted+1+task")
        assert await state.store.get(record.id) is None


async def test_with_keys_the_dashboard_asks_for_one_once(state: AppState) -> None:
    store = KeyStore(state.pool, state.settings.database_schema)
    _, reader = await store.create("ui-reader", ["tasks:read"])
    async with http_for(state, api_keys=["admin-key-for-ui-tests"]) as http:
        away = await http.get("/ui/queues")
        assert away.status_code == 303
        assert away.headers["location"] == "/ui/login?next=/ui/queues"
        form = await http.get("/ui/login?next=/ui/queues")
        assert form.status_code == 200
        token = csrf_of(form.text)
        wrong = await http.post("/ui/login", data={"csrf": token, "key": "nope"})
        assert wrong.status_code == 401
        assert "unknown API key" in wrong.text
        stale = await http.post("/ui/login", data={"csrf": "other", "key": reader})
        assert stale.status_code == 403
        token = csrf_of((await http.get("/ui/login")).text)
        signed = await http.post("/ui/login",
                                 data={"csrf": token, "key": reader, "next": "/ui/queues"})
        assert signed.status_code == 303, signed.text
        assert signed.headers["location"] == "/ui/queues"
        assert "HttpOnly" in signed.headers["set-cookie"]
        page = await http.get("/ui/queues")
        assert page.status_code == 200
        assert "read-only" in page.text
        # no action buttons for a reader, and its POSTs refused for the scope
        record = (await state.client.enqueue_many(
            [TaskRequest("echo", {"value": 1}, delay_s=3600)]))[0].record
        task_page = await http.get(f"/ui/tasks/{record.id}")
        assert ">Cancel<" not in task_page.text
        assert "Enqueue a copy" not in task_page.text
        refused = await http.post(f"/ui/tasks/{record.id}/cancel",
                                  data={"csrf": csrf_of(task_page.text)})
        assert refused.status_code == 403
        assert "tasks:manage" in refused.json()["detail"]
        out = await http.post("/ui/logout", data={"csrf": csrf_of(task_page.text)})
        assert out.status_code == 303
        assert (await http.get("/ui/queues")).status_code == 303


async def test_workers_page_flags_stale_beats(state: AppState) -> None:
    await state.workers.beat("live-one", host="h1", pid=1, types=["echo"], concurrency=4,
                             info={"processed": 12})
    await state.workers.beat("gone-quiet", host="h2", pid=2, types=["echo"], concurrency=4,
                             info={})
    await state.pool.execute(
        f"UPDATE {state.workers.table} SET beat_at = now() - interval '1 hour'"
        " WHERE id = 'gone-quiet'")
    async with http_for(state) as http:
        page = (await http.get("/ui/workers")).text
    live_row = page[page.index('data-worker="live-one"'):].split("</tr>")[0]
    stale_row = page[page.index('data-worker="gone-quiet"'):].split("</tr>")[0]
    assert ">live<" in live_row
    assert ">12<" in live_row
    assert ">stale<" in stale_row
