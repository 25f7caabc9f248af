"""The README's run command (`make run`) on embedded servers: no DATABASE_URL, no REDIS_URL.

Ctrl+C is a SIGINT to the terminal's whole foreground process group; the test sends exactly
that, then checks Conveyor exited 0 and that no process it started survives, the embedded
Postgres and Valkey (which run in sessions of their own) included.
"""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from conveyor.config import DEV_WEBHOOK_SECRET
from conveyor.testing.servers import free_port
from tests.conftest import eventually
from tests.receiver import Receiver, serve_receiver
from tests.system.conftest import ROOT

pytestmark = pytest.mark.slow


class MakeRun:
    """`make run` in a session of its own, as a terminal would start it."""

    def __init__(self, data_dir: Path, log: Path, args: str = "") -> None:
        self.port = free_port()
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("CONVEYOR_") and k not in ("DATABASE_URL", "REDIS_URL")}
        env.update(CONVEYOR_PORT=str(self.port), CONVEYOR_DATA_DIR=str(data_dir),
                   CONVEYOR_LOG_FORMAT="json",
                   CONVEYOR_WEBHOOK_ALLOW_CIDRS="127.0.0.1/32")  # the test's receiver
        self.data_dir = data_dir
        self.log = log
        with open(log, "ab") as out:
            self.popen = subprocess.Popen(["make", "--no-print-directory", "run", f"ARGS={args}"],
                                          cwd=ROOT, env=env, stdout=out,
                                          stderr=subprocess.STDOUT, start_new_session=True)
        self.base = f"http://127.0.0.1:{self.port}"

    async def ready(self) -> bool:
        if self.popen.poll() is not None:
            raise AssertionError(f"make run exited early:\n{self.log.read_text()[-3000:]}")
        try:
            async with httpx.AsyncClient(base_url=self.base, timeout=1) as http:
                return (await http.get("/readyz")).status_code == 200
        except httpx.HTTPError:
            return False

    def servers(self) -> list[int]:
        """Pids of processes working inside the data dir: the embedded servers."""
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    cwd = os.readlink(entry / "cwd")
                except OSError:
                    continue
                if cwd.startswith(str(self.data_dir)):
                    found.append(int(entry.name))
        return found

    def ctrl_c(self) -> int | None:
        """SIGINT to the foreground group; returns Conveyor's own exit code from its log."""
        os.killpg(self.popen.pid, signal.SIGINT)
        self.popen.wait(60)
        codes = re.findall(r'"exit_code":(\d+)', self.log.read_text())
        return int(codes[-1]) if codes else None

    def kill(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(10)


def alive(pids: list[int]) -> list[int]:
    return [pid for pid in pids if os.path.exists(f"/proc/{pid}")]


@pytest.fixture
def data_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="conveyor-data-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    async with serve_receiver(Receiver(DEV_WEBHOOK_SECRET)) as running:
        yield running


def thumbnail_payload() -> dict[str, Any]:
    image = Image.new("RGB", (300, 200), (10, 120, 200))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return {"image_base64": base64.b64encode(out.getvalue()).decode(), "width": 30,
            "height": 30}


async def status(base: str, task_id: str) -> str:
    async with httpx.AsyncClient(base_url=base) as http:
        return str((await http.get(f"/v1/tasks/{task_id}")).json()["status"])


async def test_make_run_serves_on_embedded_servers_and_stops_them_on_ctrl_c(
    data_dir: Path, tmp_path: Path, receiver: tuple[Receiver, str]
) -> None:
    hook, url = receiver
    run = MakeRun(data_dir, tmp_path / "run.log")
    try:
        await eventually(run.ready, timeout_s=120, interval_s=0.2)
        servers = run.servers()
        assert len(servers) >= 2, servers  # postgres (plus its children) and valkey
        async with httpx.AsyncClient(base_url=run.base) as http:
            assert (await http.get("/docs")).status_code == 200
            webhook = (await http.post("/v1/tasks", json={
                "type": "webhook", "payload": {"url": url, "body": {"hello": "world"}}})).json()
            thumb = (await http.post("/v1/tasks", json={
                "type": "thumbnail", "payload": thumbnail_payload()})).json()
        for task in (webhook, thumb):
            await eventually(lambda t=task: _is(run.base, t["id"], "succeeded"),  # type: ignore[misc]
                             timeout_s=60)
        assert hook.received[0]["valid"]
        assert hook.received[0]["body"] == {"hello": "world"}
        assert run.ctrl_c() == 0
        assert alive(servers) == []
        assert run.servers() == []
    finally:
        run.kill()
    log = run.log.read_text()
    assert "embedded.stopped" in log


async def _is(base: str, task_id: str, wanted: str) -> bool:
    return await status(base, task_id) == wanted


async def test_a_task_queued_before_ctrl_c_runs_after_the_next_start(
    data_dir: Path, tmp_path: Path
) -> None:
    first = MakeRun(data_dir, tmp_path / "first.log", args="--no-worker")
    try:
        await eventually(first.ready, timeout_s=120, interval_s=0.2)
        async with httpx.AsyncClient(base_url=first.base) as http:
            task = (await http.post("/v1/tasks", json={
                "type": "thumbnail", "payload": thumbnail_payload()})).json()
        assert await status(first.base, task["id"]) == "queued"
        assert first.ctrl_c() == 0
    finally:
        first.kill()
    second = MakeRun(data_dir, tmp_path / "second.log")
    try:
        await eventually(second.ready, timeout_s=120, interval_s=0.2)
        await eventually(lambda: _is(second.base, task["id"], "succeeded"), timeout_s=60)
        assert second.ctrl_c() == 0
    finally:
        second.kill()
