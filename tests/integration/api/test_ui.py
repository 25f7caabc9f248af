"""The dashboard over HTTP (in process, real Postgres and Redis): the open mode, signing in
with a key, CSRF, security headers, every page, filter errors and safe redirects. (The real
browser's tests are in tests/browser/.)"""

from __future__ import annotations

import dataclasses
import hashlib
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


async def test_pausing_from_the_dashboard_is_checked_like_the_api(state: AppState) -> None:
    async with http_for(state) as http:
        token = csrf_of((await http.get("/ui/queues")).text)
        forged = await http.post("/ui/queues/echo/pause", data={"csrf": "forged"})
        assert forged.status_code == 403, forged.text
        unknown = await http.post("/ui/queues/nosuch/pause", data={"csrf": token})
        assert unknown.status_code == 422
        assert "nosuch" in unknown.json()["detail"]
        wrong = await http.post("/ui/queues/echo/halt", data={"csrf": token})
        assert wrong.status_code == 422
        assert "halt" in wrong.json()["detail"]
        paused = await http.post("/ui/queues/echo/pause", data={"csrf": token})
        assert paused.status_code == 303
        assert paused.headers["location"].startswith("/ui/queues?notice=Paused+echo")
        api = {q["type"]: q["flow"] for q in (await http.get("/v1/queues")).json()["queues"]}
        assert api["echo"]["paused"] is True
        assert (await http.post("/ui/queues/echo/resume", data={"csrf": token})
                ).status_code == 303
        api = {q["type"]: q["flow"] for q in (await http.get("/v1/queues")).json()["queues"]}
        assert api["echo"]["paused"] is False


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


async def test_a_key_without_tasks_read_sees_no_task(state: AppState) -> None:
    store = KeyStore(state.pool, state.settings.database_schema)
    _, enqueuer = await store.create("ui-enqueuer", ["tasks:enqueue"])
    _, reader = await store.create("ui-reader-2", ["tasks:read"])
    record = (await state.client.enqueue_many(
        [TaskRequest("echo", {"value": 7}, delay_s=3600)]))[0].record
    async with http_for(state, api_keys=["admin-key-for-ui-tests"], api_key_cache=0) as http:
        token = csrf_of((await http.get("/ui/login")).text)
        refused = await http.post("/ui/login", data={"csrf": token, "key": enqueuer})
        assert refused.status_code == 403
        assert "tasks:read" in refused.text
        assert "conveyor_ui=" not in refused.headers.get("set-cookie", "")
        # a session made while the key could read, whose key then cannot: every page 403
        token = csrf_of((await http.get("/ui/login")).text)
        signed = await http.post("/ui/login", data={"csrf": token, "key": reader})
        assert signed.status_code == 303
        await state.pool.execute(
            f"UPDATE {state.settings.database_schema}.api_keys SET scopes = '{{tasks:enqueue}}'"
            " WHERE name = 'ui-reader-2'")
        for path in ("/ui", "/ui/tasks", f"/ui/tasks/{record.id}", "/ui/overview/body",
                     "/ui/dead-letters", "/ui/queues", "/ui/tasks/confirm?action=cancel"):
            page = await http.get(path)
            assert page.status_code == 403, (path, page.text)
            assert str(record.id) not in page.text
            assert "tasks:read" in page.text


async def test_act_all_honours_the_filters_id(state: AppState) -> None:
    records = [i.record for i in await state.client.enqueue_many(
        [TaskRequest("echo", {"value": n}, delay_s=3600) for n in range(5)])]
    one = records[2]
    async with http_for(state) as http:
        confirm = await http.get(f"/ui/tasks/confirm?type=echo&id={one.id}&action=cancel")
        assert confirm.status_code == 200, confirm.text
        assert 'data-count="1"' in confirm.text
        done = await http.post("/ui/tasks/act-all", data={
            "csrf": csrf_of(confirm.text), "action": "cancel", "type": "echo",
            "id": str(one.id)})
        assert done.status_code == 303, done.text
    statuses = {r.id: (await state.store.get(r.id)).status for r in records}  # type: ignore[union-attr]
    assert statuses[one.id] == "cancelled"
    assert [s for i, s in statuses.items() if i != one.id] == ["queued"] * 4


def hidden_of(html: str) -> dict[str, str]:
    form = html[html.index('action="/ui/tasks/act-all"'):].split("</form>", maxsplit=1)[0]
    return {m[1]: m[2].replace("&#43;", "+").replace("&#34;", '"')
            for m in re.finditer(r'type="hidden" name="([^"]+)" value="([^"]*)"', form)}


async def test_act_all_changes_no_more_than_was_confirmed(state: AppState) -> None:
    records = [i.record for i in await state.client.enqueue_many(
        [TaskRequest("echo", {"value": n}, delay_s=3600) for n in range(3)])]
    async with http_for(state) as http:
        confirm = await http.get("/ui/tasks/confirm?type=echo&since=1h&action=cancel")
        assert 'data-count="3"' in confirm.text
        form = hidden_of(confirm.text)
        assert form["since"].startswith("20")  # a date-time, not "1h" read again later
        assert uuid.UUID(form["upto"]) >= max(r.id for r in records)
        assert form["confirmed"] == "3"
        later = (await state.client.enqueue_many(
            [TaskRequest("echo", {"value": 9}, delay_s=3600)]))[0].record
        await state.store.request_cancel(records[0].id)
        done = await http.post("/ui/tasks/act-all", data=form)
        assert done.status_code == 303, done.text
        notice = done.headers["location"]
        assert "Cancelled+2+tasks+of+the+3+confirmed" in notice, notice
    assert (await state.store.get(later.id)).status == "queued"  # type: ignore[union-attr]
    for r in records[1:]:
        assert (await state.store.get(r.id)).status == "cancelled"  # type: ignore[union-attr]


async def test_windows_out_of_range_are_422_naming_the_field(state: AppState) -> None:
    async with http_for(state) as http:
        far = await http.get("/ui/tasks?since=1000000d")
        assert far.status_code == 422, far.text
        assert "since:" in far.text
        old = await http.get("/ui/tasks?since=1900-01-01")
        assert old.status_code == 200, old.text


async def test_the_overview_hint_goes_once_the_hour_is_read(state: AppState) -> None:
    async with http_for(state) as http:
        first = await http.get("/ui")
        assert first.status_code == 200
        for _ in range(50):
            body = await http.get("/ui/overview/body")
            if "fill in shortly" not in body.text:
                break
        else:
            raise AssertionError("the overview still says it is filling in")
        assert "fill in shortly" not in (await http.get("/ui")).text


async def test_act_all_stops_at_the_cap_and_says_more_match(state: AppState) -> None:
    records = [i.record for i in await state.client.enqueue_many(
        [TaskRequest("echo", {"value": n}, delay_s=3600) for n in range(5)])]
    async with http_for(state, ui_bulk_max=3) as http:
        confirm = await http.get("/ui/tasks/confirm?type=echo&action=cancel")
        assert 'data-count="4"' in confirm.text  # counted up to the cap + 1
        assert "more than 3" in confirm.text
        done = await http.post("/ui/tasks/act-all", data=hidden_of(confirm.text))
        assert "Cancelled+3+tasks%3B+more+match" in done.headers["location"]
        again = await http.post("/ui/tasks/act-all", data=hidden_of(confirm.text))
        notice = again.headers["location"]
        assert "Cancelled+2+tasks" in notice
        assert "more+match" not in notice
    for r in records:
        assert (await state.store.get(r.id)).status == "cancelled"  # type: ignore[union-attr]


async def test_act_all_with_a_payload_field_examines_the_scan_then_offers_the_rest(
        state: AppState) -> None:
    records = [i.record for i in await state.client.enqueue_many(
        [TaskRequest("echo", {"value": n % 2}, delay_s=3600) for n in range(150)])]
    ones = {r.id for r in records if r.payload["value"] == 1}
    first = len(ones & set(sorted((r.id for r in records), reverse=True)[:100]))
    async with http_for(state, ui_search_scan=100) as http:
        confirm = await http.get(
            "/ui/tasks/confirm?type=echo&field=payload.value+%3D+1&action=cancel")
        assert confirm.status_code == 200, confirm.text
        assert f'data-count="{first}"' in confirm.text
        assert "among the 100 newest" in confirm.text
        assert "confirm the next part" in confirm.text
        done = await http.post("/ui/tasks/act-all", data=hidden_of(confirm.text))
        assert done.status_code == 303, done.text
        location = done.headers["location"]
        assert location.startswith("/ui/tasks/confirm?"), location
        assert f"Cancelled+{first}+tasks" in location
        rest = await http.get(location)
        assert f'data-count="{len(ones) - first}"' in rest.text
        assert "confirm the next part" not in rest.text
        last = await http.post("/ui/tasks/act-all", data=hidden_of(rest.text))
        assert f"Cancelled+{len(ones) - first}+tasks" in last.headers["location"]
    for r in records:
        status = (await state.store.get(r.id)).status  # type: ignore[union-attr]
        assert status == ("cancelled" if r.id in ones else "queued")


async def test_act_all_keeps_to_the_time_window(state: AppState) -> None:
    t = state.store.table
    old = (await state.client.enqueue_many(
        [TaskRequest("echo", {"value": 0}, delay_s=3600)]))[0].record
    aged = uuid.UUID(int=(old.id.int & ((1 << 80) - 1))
                     | ((int(old.created_at.timestamp() * 1000) - 7_200_000) << 80))
    await state.pool.execute(f"UPDATE {t} SET id = $1 WHERE id = $2", aged, old.id)
    new = (await state.client.enqueue_many(
        [TaskRequest("echo", {"value": 1}, delay_s=3600)]))[0].record
    async with http_for(state) as http:
        confirm = await http.get("/ui/tasks/confirm?type=echo&since=1h&action=cancel")
        assert 'data-count="1"' in confirm.text
        await http.post("/ui/tasks/act-all", data=hidden_of(confirm.text))
    assert (await state.store.get(aged)).status == "queued"  # type: ignore[union-attr]
    assert (await state.store.get(new.id)).status == "cancelled"  # type: ignore[union-attr]


async def test_bulk_retry_of_fifty_leaves_the_other_dead_alone(state: AppState) -> None:
    records = [i.record for i in await state.client.enqueue_many(
        [TaskRequest("echo", {"value": n}, delay_s=3600) for n in range(60)])]
    await state.pool.execute(
        f"UPDATE {state.store.table} SET status = 'dead', finished_at = now()"
        " WHERE id = ANY($1::uuid[])", [r.id for r in records])
    chosen = [r.id for r in records[:50]]
    async with http_for(state) as http:
        token = csrf_of((await http.get("/ui/dead-letters?type=echo")).text)
        done = await http.post("/ui/tasks/act", data={
            "csrf": token, "action": "retry", "id": [str(i) for i in chosen]})
        assert "Retried+50+tasks" in done.headers["location"]
    for r in records:
        status = (await state.store.get(r.id)).status  # type: ignore[union-attr]
        assert status == ("queued" if r.id in chosen else "dead"), r.id


async def test_sessions_keep_the_key_id_never_the_secret(state: AppState) -> None:
    store = KeyStore(state.pool, state.settings.database_schema)
    record, key = await store.create("ui-session-reader", ["tasks:read"])
    async with http_for(state, api_keys=["admin-key-for-ui-tests"], api_key_cache=0) as http:
        token = csrf_of((await http.get("/ui/login")).text)
        signed = await http.post("/ui/login", data={"csrf": token, "key": key})
        assert signed.status_code == 303
        assert "Secure" not in signed.headers["set-cookie"]  # auto, over http
        first_sid = http.cookies["conveyor_ui"]
        prefix = f"{state.settings.key_prefix}:ui:session:"
        stored = [str(await state.redis.get(k) or "").encode()
                  async for k in state.redis.scan_iter(prefix + "*")]
        assert stored
        assert all(key.encode() not in raw and b"admin-key" not in raw for raw in stored)
        assert any(record.id.encode() in raw for raw in stored)
        # signing in again drops the session the browser had
        token = csrf_of((await http.get("/ui/login")).text)
        again = await http.post("/ui/login",
                                data={"csrf": token, "key": "admin-key-for-ui-tests"})
        assert again.status_code == 303
        assert http.cookies["conveyor_ui"] != first_sid
        assert await state.redis.get(
            prefix + hashlib.sha256(first_sid.encode()).hexdigest()) is None
        stored = [str(await state.redis.get(k) or "").encode()
                  async for k in state.redis.scan_iter(prefix + "*")]
        assert all(b"admin-key" not in raw for raw in stored)
        assert (await http.get("/ui/queues")).status_code == 200
        # a revoked key's session ends
        http.cookies.clear()
        token = csrf_of((await http.get("/ui/login")).text)
        await http.post("/ui/login", data={"csrf": token, "key": key})
        assert (await http.get("/ui/queues")).status_code == 200
        await store.revoke("ui-session-reader")
        away = await http.get("/ui/queues")
        assert away.status_code == 303
        assert "revoked" in away.headers["location"]
    async with http_for(state, api_keys=["admin-key-for-ui-tests"],
                        ui_secure_cookie="on") as http:
        token = csrf_of((await http.get("/ui/login")).text)
        signed = await http.post("/ui/login",
                                 data={"csrf": token, "key": "admin-key-for-ui-tests"})
        assert "Secure" in signed.headers["set-cookie"]


async def test_notices_links_and_selections_are_the_servers_own(state: AppState) -> None:
    from conveyor import ui

    record = (await state.client.enqueue_many(
        [TaskRequest("echo", {"value": 1}, delay_s=3600)]))[0].record
    async with http_for(state) as http:
        forged = await http.get("/ui/tasks?notice=Your+key+expired%3A+go+to+evil.example")
        assert "class=\"notice\"" not in forged.text
        token = csrf_of(forged.text)
        twice = await http.post("/ui/tasks/act", data={
            "csrf": token, "action": "cancel", "id": [str(record.id)] * 3})
        location = twice.headers["location"]
        assert "Cancelled+1+task" in location
        assert "not+queued" not in location  # the same id thrice is one task
        shown = await http.get(location)
        assert "Cancelled 1 task" in shown.text
        elsewhere = await http.get(
            "/ui/tasks/confirm?type=echo&action=retry&back=https://evil.example/ui")
        assert "evil.example" not in elsewhere.text
        assert 'href="/ui/tasks">Back' in elsewhere.text
        assert (await http.get("/ui")).status_code == 200  # starts the overview's follower
        app = http._transport.app  # type: ignore[attr-defined]
        assert app.state.ui_throughput._task is not None
        await ui.close(app)
        assert app.state.ui_throughput._task.done()
