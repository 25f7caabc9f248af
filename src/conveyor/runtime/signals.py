"""SIGINT/SIGTERM → Shutdown: the first signal drains, the second forces.  [signal handling]

Only this module installs signal handlers; components take a `Shutdown` instead.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable

import structlog

from conveyor.runtime.shutdown import Shutdown

log = structlog.get_logger("conveyor.signals")
HANDLED = (signal.SIGINT, signal.SIGTERM)


def install(
    shutdown: Shutdown, loop: asyncio.AbstractEventLoop | None = None
) -> Callable[[], None]:
    """Route SIGINT and SIGTERM to `shutdown`; returns a function that removes the handlers."""
    loop = loop or asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        if shutdown.begun:
            log.warning("shutdown.forced", signal=sig.name)
            shutdown.force(f"second {sig.name}")
        else:
            log.info(
                "shutdown.started", signal=sig.name, drain_timeout_s=shutdown.drain_timeout_s
            )
            shutdown.begin(sig.name)

    for sig in HANDLED:
        loop.add_signal_handler(sig, on_signal, sig)

    def remove() -> None:
        for sig in HANDLED:
            loop.remove_signal_handler(sig)

    return remove
