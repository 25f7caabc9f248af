"""Run `conveyor` as real subprocesses against the session's servers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from conveyor.config import Settings

ROOT = Path(__file__).resolve().parents[2]


class Proc:
    """One `python -m conveyor ...` process; its output goes to a log file."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log_path = log
        self._log = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "conveyor", *args], env=env, cwd=ROOT,
            stdout=self._log, stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def signal(self, sig: int) -> None:
        self.popen.send_signal(sig)

    def wait(self, timeout_s: float = 30.0) -> int:
        return self.popen.wait(timeout_s)

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(10)
        self._log.close()


def conveyor_env(settings: Settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    env.pop("DATABASE_URL", None)
    env.pop("REDIS_URL", None)
    assert settings.database_url
    assert settings.redis_given
    env.update({
        # This checkout's code, whatever the venv has installed (tests/ for the test apps).
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
        "DATABASE_URL": settings.database_url,
        **({"REDIS_URL": settings.redis_url} if settings.redis_url else {}),
        **({"CONVEYOR_REDIS_CLUSTER": "true"} if settings.redis_cluster else {}),
        **({"CONVEYOR_REDIS_SENTINELS": ",".join(settings.redis_sentinels),
            "CONVEYOR_REDIS_SENTINEL_MASTER": settings.redis_sentinel_master or ""}
           if settings.redis_sentinels else {}),
        "CONVEYOR_DATABASE_SCHEMA": settings.database_schema,
        "CONVEYOR_KEY_PREFIX": settings.key_prefix,
        "CONVEYOR_HEARTBEAT_INTERVAL": str(settings.heartbeat_interval),
        "CONVEYOR_HEARTBEAT_TTL": str(settings.heartbeat_ttl),
        "CONVEYOR_REBALANCE_INTERVAL": str(settings.rebalance_interval),
        "CONVEYOR_RELAY_INTERVAL": str(settings.relay_interval),
        "CONVEYOR_RELAY_GRACE": str(settings.relay_grace),
        "CONVEYOR_READ_BLOCK": str(settings.read_block),
        "CONVEYOR_FORWARD_INTERVAL": str(settings.forward_interval),
        "CONVEYOR_LOG_FORMAT": "json",
    })
    env.update(extra)
    return env


Spawner = Callable[..., Proc]
Check = Callable[[], bool]


@pytest.fixture
def spawn(settings: Settings, tmp_path: Path) -> Iterator[Spawner]:
    procs: list[Proc] = []

    def start(*args: str, **extra_env: str) -> Proc:
        proc = Proc(list(args), conveyor_env(settings, **extra_env),
                    tmp_path / f"proc-{len(procs)}.log")
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.stop()


def wait_until(check: Check, timeout_s: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout_s} s")
        time.sleep(0.05)


async def api_ready(base: str) -> bool:
    """Whether the API at `base` answers `/readyz` with 200 (not yet up: False)."""
    try:
        async with httpx.AsyncClient(base_url=base, timeout=1) as http:
            return (await http.get("/readyz")).status_code == 200
    except httpx.HTTPError:
        return False
