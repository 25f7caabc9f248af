"""One live `conveyor run` (API, worker, cron) per module, on the session's PostgreSQL and
Redis, with a bootstrap admin key and a read-only key; headless Chromium (Debian's
`chromium`) driven by Playwright, a signed-in admin page shared by the module's tests."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, BrowserContext, Page, sync_playwright

from conveyor.testing.servers import PostgresServer, RedisServer, free_port
from tests.conftest import make_settings
from tests.system.conftest import ROOT, Proc, api_ready, conveyor_env

ADMIN_KEY = "ui-admin-bootstrap-key-0123456789"
# The tracked docs/screenshots/ are written only when asked (UPDATE_SCREENSHOTS=1); otherwise
# the pictures go to a scratch directory, so a test run leaves the work tree as it was.
SCREENSHOTS = (ROOT / "docs" / "screenshots" if os.environ.get("UPDATE_SCREENSHOTS") == "1"
               else Path(tempfile.gettempdir()) / "conveyor-ui-screenshots")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@dataclass
class Live:
    base: str
    api: httpx.Client
    read_only_key: str
    proc: Proc
    console: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def live(postgres: PostgresServer, redis_server: RedisServer,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    settings = make_settings(postgres, redis_server.url, heartbeat_interval=1.0,
                             heartbeat_ttl=3.0)
    port = free_port()
    env = conveyor_env(settings, CONVEYOR_API_KEYS=ADMIN_KEY, CONVEYOR_PORT=str(port),
                       CONVEYOR_CONCURRENCY="20", CONVEYOR_LOG_LEVEL="warning")
    logs = tmp_path_factory.mktemp("ui")
    proc = Proc(["run", "--app", "tests.apps.dashboard:app"], env, logs / "run.log")
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not asyncio.run(api_ready(base)):
            assert proc.popen.poll() is None, proc.output()
            assert time.monotonic() < deadline, proc.output()
            time.sleep(0.1)
        made = subprocess.run(
            [sys.executable, "-m", "conveyor", "keys", "create", "--name", "viewer",
             "--scopes", "tasks:read"], env=env, cwd=ROOT, capture_output=True, text=True,
            check=True, timeout=60)
        api = httpx.Client(base_url=base, timeout=30,
                           headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        yield Live(base, api, made.stdout.strip(), proc)
        api.close()
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert os.path.exists(CHROMIUM), "install Debian's chromium (scripts/ensure-servers.sh)"
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--no-sandbox", "--disable-gpu"])
        yield chromium
        chromium.close()


def watch_console(target: Page, into: list[str]) -> None:
    target.on("console", lambda m: into.append(f"{m.type}: {m.text}")
              if m.type == "error" else None)
    target.on("pageerror", lambda e: into.append(f"pageerror: {e}"))


def sign_in(context: BrowserContext, live: Live, key: str) -> Page:
    page = context.new_page()
    watch_console(page, live.console)
    page.goto(f"{live.base}/ui")
    assert "/ui/login" in page.url
    page.fill("input[name=key]", key)
    page.click("button:has-text('Sign in')")
    page.wait_for_url(f"{live.base}/ui")
    return page


@pytest.fixture(scope="module")
def admin(browser: Browser, live: Live) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(15_000)
    yield sign_in(context, live, ADMIN_KEY)
    context.close()


@pytest.fixture(autouse=True)
def no_console_errors(live: Live) -> Iterator[None]:
    """Every test ends with no error in any page's console."""
    before = len(live.console)
    yield
    assert live.console[before:] == []


def shoot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=False)


__all__ = ["ADMIN_KEY", "Live", "Path", "shoot", "sign_in", "watch_console"]
