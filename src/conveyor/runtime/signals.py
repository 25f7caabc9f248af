"""SIGINT/SIGTERM → Shutdown: the first signal drains, the second forces.  [signal handling]

Only this module installs signal handlers; components take a `Shutdown` instead.

One Ctrl+C can arrive twice within a fraction of a millisecond (a terminal and a process
group, a supervisor forwarding what the kernel already delivered). A signal that follows the
first one within `DEBOUNCE_S` is therefore taken as the same keypress: logged, not forced.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable

import structlog

from conveyor.runtime.shutdown import Shutdown

log = structlog.get_logger("conveyor.signals")
HANDLED = (signal.SIGINT, signal.SIGTERM)
DEBOUNCE_S = 0.3  # far above a doubled delivery (< 1 ms), below a deliberate second press


def install(
    shutdown: Shutdown,
    loop: asyncio.AbstractEventLoop | None = None,
    *,
    debounce_s: float = DEBOUNCE_S,
    clock: Callable[[], float] = time.monotonic,
) -> Callable[[], None]:
    """Route SIGINT and SIGTERM to `shutdown`; returns a function that removes the handlers.

    The first signal begins the drain; one more, at least `debounce_s` after the first, forces
    the stop. Signals closer to the first than that are ignored (and logged).
    """
    loop = loop or asyncio.get_running_loop()
    first_at: float | None = None

    def on_signal(sig: signal.Signals) -> None:
        nonlocal first_at
        now = clock()
        if first_at is None:
            first_at = now
            if shutdown.begun:  # begun by something else (a failing service): force at once
                log.warning("shutdown.forced", signal=sig.name)
                shutdown.force(f"{sig.name} while stopping")
                return
            log.info(
                "shutdown.started", signal=sig.name, drain_timeout_s=shutdown.drain_timeout_s
            )
            shutdown.begin(sig.name)
        elif now - first_at < debounce_s:
            log.info("shutdown.signal.ignored", signal=sig.name,
                     since_first_s=round(now - first_at, 6), debounce_s=debounce_s)
        else:
            log.warning("shutdown.forced", signal=sig.name)
            shutdown.force(f"second {sig.name}")

    for sig in HANDLED:
        loop.add_signal_handler(sig, on_signal, sig)

    def remove() -> None:
        for sig in HANDLED:
            loop.remove_signal_handler(sig)

    return remove
