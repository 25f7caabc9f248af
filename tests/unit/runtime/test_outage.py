"""Outage: one warning per outage, one info line when it ends, capped exponential backoff."""

from __future__ import annotations

import asyncio

import pytest
import structlog
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from conveyor.errors import Unavailable
from conveyor.runtime import outage as outage_module
from conveyor.runtime.outage import Outage
from conveyor.runtime.shutdown import Shutdown


class FixedRandom:
    def __init__(self, value: float) -> None:
        self.value = value

    def random(self) -> float:
        return self.value


@pytest.fixture(autouse=True)
def fresh_logger(monkeypatch: pytest.MonkeyPatch) -> None:
    # A logger cached by an earlier `logs.configure()` would bypass capture_logs.
    monkeypatch.setattr(outage_module, "log", structlog.get_logger("conveyor.outage"))


def outages_counted(component: str) -> float:
    value = REGISTRY.get_sample_value("conveyor_outages_total", {"component": component})
    return value or 0.0


def test_logs_once_per_outage() -> None:
    outage = Outage("unit.logs-once")
    counted = outages_counted("unit.logs-once")
    with capture_logs() as logs:
        for _ in range(5):
            outage.note(Unavailable("streams.read", "connection refused"))
    assert outage.ongoing
    assert outage.failures == 5
    assert len(logs) == 1
    (started,) = logs
    assert started["event"] == "outage.started"
    assert started["log_level"] == "warning"
    assert started["component"] == "unit.logs-once"
    assert started["op"] == "streams.read"
    assert started["error"] == "connection refused"
    assert outages_counted("unit.logs-once") == counted + 1


def test_recovery_logs_the_end_once_and_resets() -> None:
    outage = Outage("unit.recover")
    with capture_logs() as logs:
        outage.recovered()  # no outage: nothing to say
        outage.note(Unavailable("tasks.mark_running"))
        outage.note(Unavailable("tasks.mark_running"))
        outage.recovered()
        outage.recovered()
    assert [e["event"] for e in logs] == ["outage.started", "outage.ended"]
    ended = logs[1]
    assert ended["log_level"] == "info"
    assert ended["attempts"] == 2
    assert ended["duration_s"] >= 0
    assert not outage.ongoing
    assert outage.failures == 0


def test_a_new_outage_is_logged_again() -> None:
    outage = Outage("unit.again")
    counted = outages_counted("unit.again")
    with capture_logs() as logs:
        outage.note(Unavailable("a"))
        outage.recovered()
        outage.note(Unavailable("b"))
        outage.note(Unavailable("b"))
    assert [e["event"] for e in logs] == ["outage.started", "outage.ended", "outage.started"]
    assert logs[2]["op"] == "b"
    assert outages_counted("unit.again") == counted + 2


def test_backoff_grows_and_is_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outage_module, "random", FixedRandom(1.0))
    outage = Outage("unit.backoff", base_s=0.1, cap_s=1.0)
    delays = []
    for _ in range(8):
        outage.failures += 1
        delays.append(outage.next_delay_s())
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0])


def test_backoff_jitter_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outage_module, "random", FixedRandom(0.0))
    outage = Outage("unit.jitter", base_s=0.1, cap_s=1.0)
    outage.failures = 3
    assert outage.next_delay_s() == pytest.approx(0.2)  # half of 0.4
    monkeypatch.undo()
    for failures in range(1, 10):
        outage.failures = failures
        raw = min(1.0, 0.1 * 2 ** (failures - 1))
        for _ in range(20):
            assert raw / 2 <= outage.next_delay_s() <= raw


def test_backoff_before_any_failure_is_the_base() -> None:
    outage = Outage("unit.base", base_s=0.4, cap_s=5.0)
    assert 0.2 <= outage.next_delay_s() <= 0.4


def test_backoff_stays_capped_in_a_long_outage() -> None:
    # At the 5 s cap (mean wait 3.75 s) 1025 failures take about an hour; the delay must
    # stay capped rather than overflow.
    # Postgres down for ~70 minutes: 1100 failed attempts, each noted before the next delay.
    outage = Outage("unit.long", base_s=0.1, cap_s=5.0)
    with capture_logs():
        for _ in range(1100):
            outage.note(Unavailable("tasks.mark_running", "connection refused"))
    assert outage.failures == 1100
    assert 2.5 <= outage.next_delay_s() <= 5.0


async def test_failed_waits_the_backoff() -> None:
    outage = Outage("unit.failed", base_s=0.02, cap_s=0.02)
    loop = asyncio.get_running_loop()
    with capture_logs() as logs:
        began = loop.time()
        await outage.failed(Unavailable("streams.read"))
        waited = loop.time() - began
    assert 0.009 <= waited < 0.5
    assert outage.failures == 1
    assert [e["event"] for e in logs] == ["outage.started"]


async def test_failed_returns_early_once_shutdown_begins() -> None:
    outage = Outage("unit.shutdown", base_s=10.0, cap_s=10.0)
    shutdown = Shutdown()
    loop = asyncio.get_running_loop()
    loop.call_later(0.01, shutdown.begin)
    began = loop.time()
    with capture_logs():
        await asyncio.wait_for(outage.failed(Unavailable("x"), shutdown), 2)
    assert loop.time() - began < 1.0
    assert outage.failures == 1
    with capture_logs():
        began = loop.time()
        await outage.failed(Unavailable("x"), shutdown)
    assert loop.time() - began < 0.1
    assert outage.failures == 2
