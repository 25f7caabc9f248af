"""Shutdown: begin/force idempotence, wait with a timeout, the drain budget."""

from __future__ import annotations

import asyncio

import pytest

from conveyor.runtime import shutdown as shutdown_module
from conveyor.runtime.shutdown import Shutdown


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def monotonic(self) -> float:
        return self.now


def test_initial_state() -> None:
    shutdown = Shutdown(12.0)
    assert not shutdown.begun
    assert not shutdown.forced
    assert shutdown.reason is None
    assert shutdown.drain_remaining() == 12.0


def test_begin_keeps_the_first_reason_and_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr(shutdown_module, "time", clock)
    shutdown = Shutdown(10.0)
    shutdown.begin("SIGTERM")
    clock.now += 4.0
    shutdown.begin("second")
    assert shutdown.begun
    assert shutdown.reason == "SIGTERM"
    assert shutdown.drain_remaining() == 6.0
    clock.now += 100.0
    assert shutdown.drain_remaining() == 0.0


def test_begin_default_reason() -> None:
    shutdown = Shutdown()
    shutdown.begin()
    assert shutdown.reason == "requested"
    assert not shutdown.forced


def test_force_begins_and_empties_the_budget() -> None:
    shutdown = Shutdown(30.0)
    shutdown.force("second ctrl-c")
    assert shutdown.begun
    assert shutdown.forced
    assert shutdown.reason == "second ctrl-c"
    assert shutdown.drain_remaining() == 0.0


def test_force_after_begin_keeps_the_first_reason() -> None:
    shutdown = Shutdown(30.0)
    shutdown.begin("SIGTERM")
    assert shutdown.drain_remaining() > 29.0
    shutdown.force()
    shutdown.force("again")
    assert shutdown.forced
    assert shutdown.reason == "SIGTERM"
    assert shutdown.drain_remaining() == 0.0


async def test_wait_with_timeout_returns_false_then_true() -> None:
    shutdown = Shutdown()
    loop = asyncio.get_running_loop()
    began = loop.time()
    assert await shutdown.wait(0.02) is False
    assert loop.time() - began >= 0.015
    shutdown.begin()
    assert await shutdown.wait(0.02) is True
    assert await shutdown.wait() is True


async def test_wait_wakes_when_shutdown_begins() -> None:
    shutdown = Shutdown()
    loop = asyncio.get_running_loop()
    loop.call_later(0.01, shutdown.begin, "later")
    began = loop.time()
    assert await shutdown.wait(5.0) is True
    assert loop.time() - began < 1.0
    assert shutdown.reason == "later"


async def test_wait_without_timeout_blocks_until_begin() -> None:
    shutdown = Shutdown()
    waiter = asyncio.create_task(shutdown.wait())
    await asyncio.sleep(0.01)
    assert not waiter.done()
    shutdown.begin()
    assert await asyncio.wait_for(waiter, 1) is True


async def test_wait_forced() -> None:
    shutdown = Shutdown()
    waiter = asyncio.create_task(shutdown.wait_forced())
    shutdown.begin()
    await asyncio.sleep(0.01)
    assert not waiter.done()
    shutdown.force()
    await asyncio.wait_for(waiter, 1)
    assert waiter.done()


def test_drain_remaining_counts_down(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock(50.0)
    monkeypatch.setattr(shutdown_module, "time", clock)
    shutdown = Shutdown(5.0)
    clock.now += 3.0  # time before begin does not count
    assert shutdown.drain_remaining() == 5.0
    shutdown.begin()
    clock.now += 1.5
    assert shutdown.drain_remaining() == 3.5
    clock.now += 3.5
    assert shutdown.drain_remaining() == 0.0


def test_when_begun_calls_back_once_at_the_begin_or_at_once_after_it() -> None:
    shutdown = Shutdown(1.0)
    calls: list[str] = []
    shutdown.when_begun(lambda: calls.append("before"))
    assert calls == []
    shutdown.begin("test")
    shutdown.begin("again")
    assert calls == ["before"]
    shutdown.when_begun(lambda: calls.append("after"))
    assert calls == ["before", "after"]
