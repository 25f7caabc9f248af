"""Run services together; when one fails, the others drain and the error is reported.
[concurrent start]

A bare `TaskGroup` would cancel the siblings of a failed task mid-work; here a failure begins the
shared shutdown instead, so every other service stops the graceful way. Only `Shutdown.force()`
cancels.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import structlog

from conveyor.runtime.shutdown import Shutdown

log = structlog.get_logger("conveyor.supervisor")


class Service(Protocol):
    """A long-lived piece of the process: runs until shutdown begins and its work is drained."""

    name: str

    async def run(self, shutdown: Shutdown) -> None: ...


@dataclass(frozen=True)
class ServiceFailure:
    service: str
    error: BaseException


class ServicesFailed(Exception):
    """One or more services failed; `failures` lists them in the order they happened."""

    def __init__(self, failures: Sequence[ServiceFailure]) -> None:
        self.failures = list(failures)
        names = ", ".join(f"{f.service}: {f.error!r}" for f in self.failures)
        super().__init__(f"service failed: {names}")


async def supervise(services: Sequence[Service], shutdown: Shutdown) -> None:
    """Run `services` until all return; raise ServicesFailed if any failed or quit early."""
    failures: list[ServiceFailure] = []

    async def guard(service: Service) -> None:
        try:
            await service.run(shutdown)
        except asyncio.CancelledError:
            if not shutdown.forced:
                raise
            return
        except Exception as exc:  # reported below, after the others drain
            failures.append(ServiceFailure(service.name, exc))
            log.error("service.failed", service=service.name, exc_info=exc)
            shutdown.begin(f"{service.name} failed")
            return
        if not shutdown.begun:
            error = RuntimeError(f"{service.name} stopped before shutdown began")
            failures.append(ServiceFailure(service.name, error))
            shutdown.begin(f"{service.name} stopped")
        log.debug("service.stopped", service=service.name)

    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(guard(s), name=s.name) for s in services]

        async def cancel_on_force() -> None:
            await shutdown.wait_forced()
            for task in tasks:
                task.cancel()

        watcher = asyncio.create_task(cancel_on_force())
        try:
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            watcher.cancel()
    if failures:
        raise ServicesFailed(failures)
