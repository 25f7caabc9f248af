"""supervise: services drain together; failures are reported after the others stopped."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest
import structlog
from structlog.testing import capture_logs

from conveyor.runtime import supervisor as supervisor_module
from conveyor.runtime.shutdown import Shutdown
from conveyor.runtime.supervisor import ServiceFailure, ServicesFailed, supervise


@pytest.fixture(autouse=True)
def fresh_logger(monkeypatch: pytest.MonkeyPatch) -> None:
    # A logger cached by an earlier `logs.configure()` would bypass capture_logs.
    monkeypatch.setattr(supervisor_module, "log", structlog.get_logger("conveyor.supervisor"))


@dataclass
class Drains:
    """Runs until shutdown begins, then finishes its work normally."""

    name: str
    drain_s: float = 0.0
    events: list[str] = field(default_factory=list)

    async def run(self, shutdown: Shutdown) -> None:
        try:
            await shutdown.wait()
            self.events.append("draining")
            await asyncio.sleep(self.drain_s)
            self.events.append("drained")
        except asyncio.CancelledError:
            self.events.append("cancelled")
            raise


@dataclass
class Crashes:
    name: str
    error: Exception
    after_s: float = 0.005

    async def run(self, shutdown: Shutdown) -> None:
        await asyncio.sleep(self.after_s)
        raise self.error


@dataclass
class QuitsEarly:
    name: str

    async def run(self, shutdown: Shutdown) -> None:
        await asyncio.sleep(0.001)


@dataclass
class Stubborn:
    """Ignores shutdown: only cancellation stops it."""

    name: str
    events: list[str] = field(default_factory=list)

    async def run(self, shutdown: Shutdown) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.events.append("cancelled")
            raise


async def test_services_that_return_on_shutdown_end_without_error() -> None:
    shutdown = Shutdown(1.0)
    services = [Drains("a"), Drains("b", drain_s=0.01)]
    runner = asyncio.create_task(supervise(services, shutdown))
    await asyncio.sleep(0.01)
    assert not runner.done()
    shutdown.begin("test")
    await asyncio.wait_for(runner, 1)
    assert runner.exception() is None
    assert [s.events for s in services] == [["draining", "drained"], ["draining", "drained"]]


async def test_no_services_returns_at_once() -> None:
    await asyncio.wait_for(supervise([], Shutdown()), 1)


async def test_a_failure_begins_shutdown_and_siblings_drain() -> None:
    shutdown = Shutdown(1.0)
    error = ValueError("redis exploded")
    sibling = Drains("worker", drain_s=0.01)
    with capture_logs() as logs, pytest.raises(ServicesFailed) as info:
        await asyncio.wait_for(supervise([sibling, Crashes("cron", error)], shutdown), 1)
    assert shutdown.begun
    assert shutdown.reason == "cron failed"
    assert not shutdown.forced
    assert sibling.events == ["draining", "drained"]  # returned normally, not cancelled
    assert info.value.failures == [ServiceFailure("cron", error)]
    assert "cron" in str(info.value)
    assert "redis exploded" in str(info.value)
    failed = [e for e in logs if e["event"] == "service.failed"]
    assert len(failed) == 1
    assert failed[0]["service"] == "cron"
    assert failed[0]["log_level"] == "error"


async def test_failures_are_listed_in_order() -> None:
    shutdown = Shutdown(1.0)
    first = RuntimeError("first")
    second = KeyError("second")
    with capture_logs(), pytest.raises(ServicesFailed) as info:
        await asyncio.wait_for(
            supervise([Crashes("late", second, 0.02), Crashes("early", first, 0.001)], shutdown),
            1,
        )
    # "late" sleeps through the shutdown that "early" began, then fails too
    assert [f.service for f in info.value.failures] == ["early", "late"]
    assert [f.error for f in info.value.failures] == [first, second]
    assert shutdown.reason == "early failed"


async def test_a_service_returning_before_shutdown_is_a_failure() -> None:
    shutdown = Shutdown(1.0)
    sibling = Drains("api")
    with capture_logs(), pytest.raises(ServicesFailed) as info:
        await asyncio.wait_for(supervise([QuitsEarly("relay"), sibling], shutdown), 1)
    assert shutdown.begun
    assert shutdown.reason == "relay stopped"
    assert sibling.events == ["draining", "drained"]
    (failure,) = info.value.failures
    assert failure.service == "relay"
    assert isinstance(failure.error, RuntimeError)
    assert "stopped before shutdown began" in str(failure.error)


async def test_force_cancels_services_that_do_not_drain() -> None:
    shutdown = Shutdown(1.0)
    stubborn = Stubborn("stuck")
    polite = Drains("polite")
    runner = asyncio.create_task(supervise([stubborn, polite], shutdown))
    await asyncio.sleep(0.005)
    shutdown.begin("SIGTERM")
    await asyncio.sleep(0.01)
    assert not runner.done()
    assert stubborn.events == []
    shutdown.force()
    await asyncio.wait_for(runner, 1)
    assert runner.exception() is None
    assert stubborn.events == ["cancelled"]
    assert polite.events == ["draining", "drained"]


async def test_force_also_cancels_a_slow_drain() -> None:
    shutdown = Shutdown(1.0)
    slow = Drains("slow", drain_s=10.0)
    runner = asyncio.create_task(supervise([slow], shutdown))
    await asyncio.sleep(0.001)
    shutdown.begin()
    await asyncio.sleep(0.005)
    shutdown.force()
    await asyncio.wait_for(runner, 1)
    assert slow.events == ["draining", "cancelled"]


async def test_cancelling_the_supervisor_without_force_propagates() -> None:
    shutdown = Shutdown(1.0)
    runner = asyncio.create_task(supervise([Stubborn("stuck")], shutdown))
    await asyncio.sleep(0.005)
    runner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(runner, 1)
