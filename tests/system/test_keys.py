"""`conveyor keys` as a real command, the rate limit shared by two `conveyor api` processes,
and an exposed API with no key refusing to start before it listens."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest

from conveyor.config import Settings
from conveyor.state import AppState
from conveyor.store.keys import KEY_PATTERN
from conveyor.testing.servers import free_port
from tests.conftest import eventually
from tests.system.conftest import ROOT, Spawner, api_ready, conveyor_env

pytestmark = pytest.mark.slow
# TEST-NET-1: never an address of this machine, so binding it fails if the check did not.
ELSEWHERE = "192.0.2.1"


def conveyor(settings: Settings, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "conveyor", *args], env=conveyor_env(settings, **env), cwd=ROOT,
        capture_output=True, text=True, timeout=60, check=False,
    )


async def test_keys_create_list_and_revoke_from_the_command_line(state: AppState) -> None:
    settings = state.settings
    made = conveyor(settings, "keys", "create", "--name", "ci", "--scopes",
                    "tasks:read,tasks:enqueue", "--types", "echo", "--expires-in", "30d",
                    "--rate", "100/s")
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert made.stdout == key + "\n"  # the key alone: KEY=$(conveyor keys create ...)
    assert KEY_PATTERN.fullmatch(key)

    listed = conveyor(settings, "keys", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    [row] = json.loads(listed.stdout)
    assert row["name"] == "ci"
    assert row["scopes"] == ["tasks:read", "tasks:enqueue"]
    assert row["types"] == ["echo"]
    assert row["rate"] == "100/s"
    assert row["state"] == "active"
    assert row["expires_at"] is not None
    assert key.startswith(row["prefix"])
    table = conveyor(settings, "keys", "list")
    assert "ci" in table.stdout
    assert key.split("_", 2)[2] not in listed.stdout + table.stdout  # the secret may hold "_"

    taken = conveyor(settings, "keys", "create", "--name", "ci", "--scopes", "admin")
    assert taken.returncode == 1
    assert "'ci' exists already" in taken.stderr
    assert taken.stdout == ""
    bad = conveyor(settings, "keys", "create", "--name", "x", "--scopes", "tasks:write")
    assert bad.returncode == 2
    assert "tasks:write" in bad.stderr
    bad_rate = conveyor(settings, "keys", "create", "--name", "x", "--scopes", "admin",
                        "--rate", "fast")
    assert bad_rate.returncode == 2
    assert "N/s, N/m or N/h" in bad_rate.stderr

    revoked = conveyor(settings, "keys", "revoke", "ci")
    assert revoked.returncode == 0, revoked.stderr
    assert "revoked ci" in revoked.stderr
    [row] = json.loads(conveyor(settings, "keys", "list", "--json").stdout)
    assert row["state"] == "revoked"
    missing = conveyor(settings, "keys", "revoke", "nobody")
    assert missing.returncode == 1
    assert "nobody" in missing.stderr


async def test_two_api_processes_share_one_keys_rate_limit(
    state: AppState, spawn: Spawner
) -> None:
    made = conveyor(state.settings, "keys", "create", "--name", "limited", "--scopes",
                    "tasks:read", "--rate", "5/h")
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    ports = [free_port(), free_port()]
    for port in ports:
        spawn("api", "--port", str(port))
    bases = [f"http://127.0.0.1:{port}" for port in ports]
    for base in bases:
        await eventually(lambda base=base: api_ready(base), timeout_s=30)  # type: ignore[misc]
    answers: list[httpx.Response] = []
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(timeout=10) as http:
        for i in range(20):  # alternating between the two processes
            answers.append(await http.get(f"{bases[i % 2]}/v1/tasks", headers=headers))
    codes = [a.status_code for a in answers]
    assert codes.count(200) == 5, codes  # 5 per hour in all, not 5 per process
    assert codes.count(429) == 15, codes
    served_by = {i % 2 for i, a in enumerate(answers) if a.status_code == 200}
    assert served_by == {0, 1}
    limited = [a for a in answers if a.status_code == 429]
    assert {i % 2 for i, a in enumerate(answers) if a.status_code == 429} == {0, 1}
    for answer in limited:
        assert answer.headers["content-type"] == "application/problem+json"
        assert 1 <= int(answer.headers["retry-after"]) <= 720  # one request per 720 s


async def test_an_exposed_api_without_keys_refuses_to_start_before_listening(
    state: AppState, spawn: Spawner
) -> None:
    port = free_port()
    refused = spawn("api", "--host", ELSEWHERE, "--port", str(port))
    assert refused.wait(60) == 2
    output = refused.output()
    assert f"refusing to serve the API on '{ELSEWHERE}' with no API keys" in output
    assert "CONVEYOR_ALLOW_ANONYMOUS=true" in output
    assert "cannot listen" not in output  # it never tried to bind

    # Allowed, or with a key, it goes on to bind (which fails here: not this machine's address).
    allowed = spawn("api", "--host", ELSEWHERE, "--port", str(port),
                    CONVEYOR_ALLOW_ANONYMOUS="true")
    keyed = spawn("api", "--host", ELSEWHERE, "--port", str(port), CONVEYOR_API_KEYS="boot")
    for proc in (allowed, keyed):
        assert proc.wait(60) == 1  # a service that failed to start
        assert f"cannot listen on {ELSEWHERE}:{port}" in proc.output()
        assert "refusing" not in proc.output()
