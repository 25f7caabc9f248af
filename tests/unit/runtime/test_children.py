"""Children: the restart pause, and the supervision of real (tiny) processes: one that dies
is started again, SIGTERM drains all, one that fails its drain fails the supervisor."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from conveyor.runtime.children import SUPERVISOR_ENV, Backoff, Children, ChildrenFailed
from conveyor.runtime.shutdown import Shutdown
from tests.conftest import eventually

# A child that notes its pid in a directory, then waits for SIGTERM and exits with CODE.
CHILD = """
import os, signal, sys, time
from collections.abc import AsyncIterator
from pathlib import Path
note = Path(sys.argv[1], f".{os.getpid()}")
note.write_text(os.environ[sys.argv[3]])
note.rename(Path(sys.argv[1], str(os.getpid())))
signal.signal(signal.SIGTERM, lambda *_: sys.exit(int(sys.argv[2])))
while True:
    time.sleep(0.05)
"""


def test_the_pause_doubles_per_quick_death_up_to_the_cap() -> None:
    backoff = Backoff(base_s=0.5, cap_s=30.0)
    assert [backoff.delay(n) for n in range(1, 9)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert backoff.delay(0) == 0.5  # after a stable run, the first pause again


def children(tmp_path: Path, count: int, *, exit_code: int = 0) -> Children:
    command = [sys.executable, "-c", CHILD, str(tmp_path), str(exit_code), SUPERVISOR_ENV]
    return Children(command, count, env=dict(os.environ),
                    backoff=Backoff(base_s=0.05, cap_s=0.2, stable_s=60))


def started(tmp_path: Path) -> set[int]:
    return {int(p.name) for p in tmp_path.iterdir() if not p.name.startswith(".")}


@contextlib.asynccontextmanager
async def supervising(pool: Children, shutdown: Shutdown) -> AsyncIterator[asyncio.Task[None]]:
    """`pool` running; drained (or, if the test failed first, forced) at the end."""
    running = asyncio.create_task(pool.run(shutdown))
    try:
        yield running
    finally:
        if not running.done():
            shutdown.force("test over")
            await asyncio.gather(running, return_exceptions=True)


async def test_a_dead_child_is_replaced_and_sigterm_drains_every_child(tmp_path: Path) -> None:
    pool = children(tmp_path, 2)
    shutdown = Shutdown(drain_timeout_s=5)

    async def two() -> bool:
        return len(pool.live) == 2 and started(tmp_path) >= set(pool.live)

    async def replaced() -> bool:
        return (pool.restarts == 1 and len(pool.live) == 2 and victim not in pool.live
                and started(tmp_path) >= set(pool.live))

    async with supervising(pool, shutdown) as running:
        await eventually(two, timeout_s=20)
        first = set(pool.live)
        assert {(tmp_path / str(pid)).read_text() for pid in first} == {str(os.getpid())}
        victim = min(first)
        os.kill(victim, 9)
        await eventually(replaced, timeout_s=20)
        assert len(started(tmp_path)) == 3
        shutdown.begin("test")
        await asyncio.wait_for(running, 20)
    assert pool.live == []
    assert pool.failures == []


async def test_a_crash_loop_waits_longer_each_time(tmp_path: Path) -> None:
    pool = Children([sys.executable, "-c", "import sys; sys.exit(3)"], 1, env=dict(os.environ),
                    backoff=Backoff(base_s=0.05, cap_s=0.4, stable_s=60))
    shutdown = Shutdown(drain_timeout_s=1)

    async def looping() -> bool:
        return pool.restarts >= 5

    began = time.monotonic()
    async with supervising(pool, shutdown) as running:
        await eventually(looping, timeout_s=30)
        took = time.monotonic() - began
        shutdown.begin("test")
        await asyncio.wait_for(running, 10)
    # The fifth restart comes after four pauses, each twice the last: not a spin.
    assert took >= 0.05 + 0.1 + 0.2 + 0.4


async def test_a_child_that_fails_its_drain_fails_the_supervisor(tmp_path: Path) -> None:
    pool = children(tmp_path, 2, exit_code=1)
    shutdown = Shutdown(drain_timeout_s=5)

    async def two() -> bool:
        return len(started(tmp_path)) == 2

    async with supervising(pool, shutdown) as running:
        await eventually(two, timeout_s=20)
        shutdown.begin("test")
        with pytest.raises(ChildrenFailed, match="exit 1") as failed:
            await asyncio.wait_for(running, 20)
    assert sorted(f.slot for f in failed.value.failures) == [0, 1]


async def test_a_child_stopped_by_sigterm_before_it_took_the_signal_has_drained(
    tmp_path: Path,
) -> None:
    # A `conveyor worker` child installs its SIGTERM handler before it takes any work, so one
    # that the drain's SIGTERM ends while still starting (the default action: exit -15) had
    # nothing to drain: the supervisor still exits 0.
    note = tmp_path / "up"
    starting = f"import pathlib, time; pathlib.Path({str(note)!r}).touch(); time.sleep(60)"
    pool = Children([sys.executable, "-c", starting], 2, env=dict(os.environ))
    shutdown = Shutdown(drain_timeout_s=5)

    async def up() -> bool:
        return note.exists() and len(pool.live) == 2

    async with supervising(pool, shutdown) as running:
        await eventually(up, timeout_s=20)
        shutdown.begin("test")
        await asyncio.wait_for(running, 20)
    assert pool.failures == []
    assert pool.live == []
