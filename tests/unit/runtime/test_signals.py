"""Signals: the first SIGINT drains, a doubled delivery of it is ignored, a later one forces.

Real signals are sent to this process; the handlers run on the test's event loop.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator, MutableMapping
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from conveyor.runtime import signals
from conveyor.runtime.shutdown import Shutdown
from tests.conftest import eventually


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
def fresh_logger(monkeypatch: pytest.MonkeyPatch) -> None:
    # A logger cached by an earlier `logs.configure()` would bypass capture_logs.
    monkeypatch.setattr(signals, "log", structlog.get_logger("conveyor.signals"))


@pytest.fixture
def logs() -> Iterator[list[MutableMapping[str, Any]]]:
    with capture_logs() as captured:
        yield captured


async def until(check: Callable[[], bool]) -> None:
    async def met() -> bool:
        return check()

    await eventually(met, timeout_s=5, interval_s=0.001)


def events(logs: list[MutableMapping[str, Any]]) -> list[str]:
    return [str(e["event"]) for e in logs]


async def test_a_doubled_sigint_drains_and_a_later_one_forces(
    logs: list[MutableMapping[str, Any]],
) -> None:
    clock = Clock()
    shutdown = Shutdown(5.0)
    remove = signals.install(shutdown, clock=clock)
    try:
        os.kill(os.getpid(), signal.SIGINT)
        await until(lambda: shutdown.begun)
        clock.now += 0.00015  # the same keypress, seen twice 0.15 ms apart
        os.kill(os.getpid(), signal.SIGINT)
        await until(lambda: "shutdown.signal.ignored" in events(logs))
        assert shutdown.begun
        assert not shutdown.forced
        assert shutdown.reason == "SIGINT"
        clock.now += signals.DEBOUNCE_S  # a deliberate second Ctrl+C, DEBOUNCE_S after the first
        os.kill(os.getpid(), signal.SIGTERM)
        await until(lambda: shutdown.forced)
    finally:
        remove()
    assert events(logs) == ["shutdown.started", "shutdown.signal.ignored", "shutdown.forced"]


async def test_a_signal_while_already_stopping_forces(
    logs: list[MutableMapping[str, Any]],
) -> None:
    shutdown = Shutdown(5.0)
    shutdown.begin("a service failed")
    remove = signals.install(shutdown, clock=Clock())
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        await until(lambda: shutdown.forced)
    finally:
        remove()
    assert events(logs) == ["shutdown.forced"]
