"""The dashboard in a real browser (headless Chromium) against a live `conveyor run`: what it
shows matches the API, and what it does is seen over the API. Each page's screenshot goes to
docs/screenshots/ with UPDATE_SCREENSHOTS=1 (to a scratch directory otherwise)."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, expect

from tests.browser.conftest import Live, shoot, sign_in, watch_console

pytestmark = pytest.mark.slow


def until(check: Callable[[], Any], timeout_s: float = 20.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} not met within {timeout_s} s"
        time.sleep(0.1)


def enqueue(live: Live, type_: str, payload: dict[str, Any], **extra: Any) -> dict[str, Any]:
    response = live.api.post("/v1/tasks", json={"type": type_, "payload": payload, **extra})
    assert response.status_code in (200, 202), response.text
    body: dict[str, Any] = response.json()
    return body


def task(live: Live, task_id: str) -> dict[str, Any]:
    response = live.api.get(f"/v1/tasks/{task_id}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = dict(response.json())
    return body


def dead(live: Live, task_id: str) -> dict[str, Any]:
    until(lambda: task(live, task_id)["status"] == "dead", what=f"{task_id} dead")
    return task(live, task_id)


def cell(page: Page, type_: str, column: str) -> str:
    return page.locator(f"tr[data-type='{type_}'] td[data-col='{column}']").inner_text().strip()


def test_overview_shows_the_types_and_counts_the_api_reports(admin: Page, live: Live) -> None:
    for i in range(3):  # queued for an hour: the counts hold still
        enqueue(live, "order", {"customer_id": 900 + i}, delay_seconds=3600)
    dead(live, enqueue(live, "doomed", {"batch": "overview"})["id"])
    admin.goto(f"{live.base}/ui")
    queues = {q["type"]: q for q in live.api.get("/v1/queues").json()["queues"]}
    assert set(queues) == {"order", "doomed", "long", "nightly"}
    for name, q in queues.items():
        for column in ("queued", "running", "dead"):
            assert cell(admin, name, column) == str(q[column]), (name, column)
    assert cell(admin, "order", "queued") == "3"
    assert int(cell(admin, "doomed", "dead_hour")) >= 1
    expect(admin.locator("nav[aria-label=main] a")).to_have_text(
        ["Overview", "Tasks", "Dead letters", "Workers", "Cron", "Queues"])
    shoot(admin, "overview")


def test_a_live_update_appears_without_reload(admin: Page, live: Live) -> None:
    admin.goto(f"{live.base}/ui")
    admin.wait_for_load_state("networkidle")
    before = int(cell(admin, "order", "queued"))
    admin.evaluate("window.conveyorMarker = 'same page'")
    enqueue(live, "order", {"customer_id": 999}, delay_seconds=3600)
    expect(admin.locator("tr[data-type='order'] td[data-col='queued']")).to_have_text(
        str(before + 1), timeout=15_000)
    assert admin.evaluate("window.conveyorMarker") == "same page"


def test_filtering_finds_a_task_by_payload_field(admin: Page, live: Live) -> None:
    ids = {c: enqueue(live, "order", {"customer_id": c})["id"] for c in (41, 42, 43)}
    admin.goto(f"{live.base}/ui/tasks")
    admin.select_option("select[name=type]", "order")
    admin.fill("input[name=field]", "payload.customer_id = 42")
    admin.click("button:has-text('Filter')")
    rows = admin.locator("table.tasks tbody tr[data-id]")
    expect(rows).to_have_count(1)
    assert rows.first.get_attribute("data-id") == ids[42]
    link = rows.first.locator("a.tid")
    expect(link).to_have_text(ids[42][:8])
    shoot(admin, "tasks")
    link.click()
    admin.wait_for_url(f"**/ui/tasks/{ids[42]}")
    expect(admin.locator("h1")).to_contain_text(ids[42][:8])


def test_a_dead_tasks_page_shows_every_attempt_and_retry_runs_it_again(
        admin: Page, live: Live) -> None:
    task_id = enqueue(live, "doomed", {"batch": "single"})["id"]
    dead(live, task_id)
    admin.goto(f"{live.base}/ui/tasks/{task_id}")
    attempts = admin.locator("table.attempts tbody tr[data-attempt]")
    expect(attempts).to_have_count(3)
    for n in (1, 2, 3):
        row = admin.locator(f"table.attempts tr[data-attempt='{n}']")
        expect(row).to_contain_text(f"card declined (attempt {n})")
        expect(row).to_contain_text("failed")
    shoot(admin, "task")
    admin.click("button:has-text('Retry')")
    expect(admin.locator(".notice")).to_contain_text("Retried")
    until(lambda: len(live.api.get(f"/v1/tasks/{task_id}/attempts").json()["attempts"]) == 6
          and task(live, task_id)["status"] == "dead", what="the retried task ran again")
    # the page follows it live: six attempts, dead again
    expect(attempts).to_have_count(6, timeout=15_000)


def test_bulk_retry_of_a_filter_of_50_dead_tasks(admin: Page, live: Live) -> None:
    batch = live.api.post("/v1/tasks/batch", json={"tasks": [
        {"type": "doomed", "payload": {"batch": "fifty"}} for _ in range(50)]})
    assert batch.status_code == 202, batch.text
    ids = [t["id"] for t in batch.json()["tasks"]]
    for task_id in ids:
        dead(live, task_id)
    admin.goto(f"{live.base}/ui/tasks?type=doomed&status=dead&field=payload.batch+%3D+fifty")
    expect(admin.locator("table.tasks tbody tr[data-id]")).to_have_count(50)
    admin.click("a:has-text('Retry all')")
    expect(admin.locator("p.confirm")).to_have_attribute("data-count", "50")
    expect(admin.locator("p.confirm")).to_contain_text("Retry 50 tasks")
    shoot(admin, "confirm")
    admin.click("form.actions button:has-text('Retry')")
    expect(admin.locator(".notice")).to_contain_text("Retried 50 tasks")

    def all_ran_again() -> bool:
        return all(len(live.api.get(f"/v1/tasks/{i}/attempts").json()["attempts"]) == 6
                   and task(live, i)["status"] == "dead" for i in ids)

    until(all_ran_again, timeout_s=40, what="all 50 ran again")


def test_cancel_a_running_task(admin: Page, live: Live) -> None:
    task_id = enqueue(live, "long", {"seconds": 60})["id"]
    until(lambda: task(live, task_id)["status"] == "running", what="running")
    admin.goto(f"{live.base}/ui/tasks/{task_id}")
    expect(admin.locator("progress")).to_be_visible(timeout=15_000)  # live progress
    admin.click("button:has-text('Cancel')")
    expect(admin.locator(".notice")).to_contain_text("Cancel requested")
    until(lambda: task(live, task_id)["status"] == "cancelled", what="cancelled")
    expect(admin.locator(".task-head .badge")).to_have_text("cancelled", timeout=15_000)


def test_pause_and_resume_a_type_from_the_queues_page(admin: Page, live: Live) -> None:
    admin.goto(f"{live.base}/ui/queues")
    row = admin.locator("tr[data-type='order']")
    try:
        row.locator("button[data-action='pause']").click()
        expect(admin.locator(".notice")).to_contain_text("Paused order")
        expect(row.locator("td[data-col='flow']")).to_contain_text("paused")
        flow = {q["type"]: q["flow"] for q in live.api.get("/v1/queues").json()["queues"]}
        assert flow["order"]["paused"] is True
        assert flow["long"]["paused"] is False
        held = enqueue(live, "order", {"customer_id": 11})["id"]  # still accepted
        # a task of another type enqueued after it runs to the end; the paused one waits
        other = enqueue(live, "long", {"seconds": 0.2})["id"]
        until(lambda: task(live, other)["status"] == "succeeded", what="the other type ran")
        assert task(live, held)["status"] == "queued"
        row.locator("button[data-action='resume']").click()
        expect(admin.locator(".notice")).to_contain_text("Resumed order")
        until(lambda: task(live, held)["status"] == "succeeded", what="resumed: it ran")
    finally:
        live.api.post("/v1/queues/order/resume")


def test_enqueue_a_copy_is_checked_against_the_schema(admin: Page, live: Live) -> None:
    source = enqueue(live, "order", {"customer_id": 7, "note": "original"})["id"]
    admin.goto(f"{live.base}/ui/tasks/{source}")
    admin.click("a:has-text('Enqueue a copy')")
    admin.fill("textarea[name=payload]", '{"customer_id": "seven"}')
    admin.click("button:has-text('Enqueue')")
    expect(admin.locator("p.error")).to_contain_text("customer_id")
    # the refused form comes back as a 422, which Chromium reports in the console (that
    # message, wherever it is among them, is the one expected)
    refused = [m for m in live.console if m.endswith("status of 422 (Unprocessable Entity)")]
    assert refused, live.console
    live.console.remove(refused[-1])
    admin.fill("textarea[name=payload]", '{"customer_id": 8, "note": "copy"}')
    admin.click("button:has-text('Enqueue')")
    expect(admin.locator(".notice")).to_contain_text("Enqueued a copy")
    copy_id = admin.url.rsplit("/", 1)[-1].split("?")[0]
    assert copy_id != source
    assert task(live, copy_id)["payload"] == {"customer_id": 8, "note": "copy"}


def test_every_page_renders(admin: Page, live: Live, browser: Browser) -> None:
    admin.goto(f"{live.base}/ui/dead-letters?type=doomed")
    expect(admin.locator("button:has-text('Retry selected')")).to_be_visible()
    expect(admin.locator("table.tasks tbody tr[data-id]").first).to_contain_text("card declined")
    shoot(admin, "dead-letters")
    admin.goto(f"{live.base}/ui/workers")
    expect(admin.locator("table.workers tbody tr[data-worker]")).to_have_count(1)
    expect(admin.locator("table.workers")).to_contain_text("live")
    shoot(admin, "workers")
    admin.goto(f"{live.base}/ui/cron")
    row = admin.locator("tr[data-job='nightly']")
    expect(row).to_contain_text("0 0 3 * * *")
    expect(row.locator("li").first).to_contain_text("03:00:00Z")
    shoot(admin, "cron")
    admin.goto(f"{live.base}/ui/queues")
    expect(admin.locator("tr[data-type='doomed'] td[data-col='max_attempts']")).to_have_text("3")
    shoot(admin, "queues")
    # dark, and on a phone
    dark = browser.new_context(color_scheme="dark", viewport={"width": 1280, "height": 900},
                               storage_state=admin.context.storage_state())
    page = dark.new_page()
    watch_console(page, live.console)
    page.goto(f"{live.base}/ui")
    shoot(page, "overview-dark")
    dark.close()
    phone = browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=2,
                                storage_state=admin.context.storage_state())
    page = phone.new_page()
    watch_console(page, live.console)
    page.goto(f"{live.base}/ui/tasks")
    shoot(page, "tasks-phone")
    phone.close()


def test_a_read_only_key_sees_no_action_buttons_and_a_forged_post_is_refused(
        browser: Browser, live: Live) -> None:
    victim = enqueue(live, "doomed", {"batch": "read-only"})["id"]
    dead(live, victim)
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    login = context.new_page()
    watch_console(login, live.console)
    login.goto(f"{live.base}/ui/tasks")
    shoot(login, "login")
    page = sign_in(context, live, live.read_only_key)
    expect(page.locator(".who")).to_contain_text("read-only")
    actions = re.compile(
        r"^(Retry|Cancel|Delete|Retry selected|Retry all|Enqueue a copy|Pause|Resume)$")
    for path in ("", "/tasks", f"/tasks/{victim}", "/dead-letters?type=doomed", "/queues"):
        page.goto(f"{live.base}/ui{path}")
        expect(page.locator("h1")).to_be_visible()
        expect(page.get_by_role("button", name=actions)).to_have_count(0)
        expect(page.get_by_role("link", name=actions)).to_have_count(0)
    page.goto(f"{live.base}/ui/tasks/{victim}")
    csrf = page.locator("input[name=csrf]").first.get_attribute("value")
    assert csrf  # the sign-out form's: a real token of this session
    # with this session's own token: the key lacks tasks:manage
    refused = context.request.post(f"{live.base}/ui/tasks/{victim}/retry",
                                   form={"csrf": csrf}, max_redirects=0)
    assert refused.status == 403, refused.text()
    paused = context.request.post(f"{live.base}/ui/queues/order/pause", form={"csrf": csrf},
                                  max_redirects=0)
    assert paused.status == 403, paused.text()
    assert "tasks:manage" in refused.text()
    # from the admin's session, without its token (a forged cross-site form)
    admin_context = browser.new_context()
    admin_page = sign_in(admin_context, live, "ui-admin-bootstrap-key-0123456789")
    forms: list[dict[str, str | float | bool]] = [{}, {"csrf": "forged"}, {"csrf": csrf}]
    for form in forms:
        forged = admin_context.request.post(f"{live.base}/ui/tasks/{victim}/retry",
                                            form=form, max_redirects=0)
        assert forged.status == 403, forged.text()
        assert "CSRF" in forged.text()
    admin_page.close()
    admin_context.close()
    assert task(live, victim)["status"] == "dead"
    context.close()


def test_security_headers(live: Live, admin: Page) -> None:
    response = admin.goto(f"{live.base}/ui/queues")
    assert response is not None
    csp = response.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in csp
    assert "script-src 'self'" in csp
    assert "unsafe-inline" not in csp
    cookies = {c["name"]: c for c in admin.context.cookies()}
    session = cookies["conveyor_ui"]
    assert session["httpOnly"] is True
    assert session["sameSite"] == "Strict"
