"""Children: `conveyor worker --processes N`, N copies of one command run side by side.
[process supervisor]

Each child is a whole `conveyor worker` (its own consumers, slots and worker id). One that
exits before shutdown begins is started again, after a pause that doubles with every quick
death (`Backoff`), so a crash loop does not spin. When shutdown begins each child gets SIGTERM
(its own drain) and the supervisor waits for all; when it is forced, each gets a second
SIGTERM (which forces a child too) and is killed if it still has not exited soon after.

A child outlives no supervisor: `follow_supervisor()` (run in the child) asks Linux for a
SIGTERM when its parent dies, so a SIGKILLed supervisor's children drain and exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import structlog

from conveyor.runtime.shutdown import Shutdown
from conveyor.runtime.signals import DEBOUNCE_S

log = structlog.get_logger("conveyor.processes")
SUPERVISOR_ENV = "_CONVEYOR_SUPERVISOR_PID"  # set in each child: its supervisor's pid
EXIT_FORCED = 130
CHILD_GRACE_S = 15.0  # past the drain budget, for a child's last writes and exit
FORCE_WAIT_S = 5.0  # after the forcing signal, before SIGKILL
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Backoff:
    """Pause before restarting a child: `base_s` doubled per quick death in a row, at most
    `cap_s`; a child that ran `stable_s` or longer starts the count again."""

    base_s: float = 0.5
    cap_s: float = 30.0
    stable_s: float = 60.0

    def delay(self, quick_deaths: int) -> float:
        if quick_deaths <= 0:
            return self.base_s
        return float(min(self.cap_s, self.base_s * 2 ** (quick_deaths - 1)))


@dataclass(frozen=True)
class ChildFailure:
    slot: int
    pid: int
    exit_code: int


class ChildrenFailed(Exception):
    """Children that did not drain: non-zero exits, or killed past the drain budget."""

    def __init__(self, failures: Sequence[ChildFailure]) -> None:
        self.failures = list(failures)
        super().__init__("processes did not drain: " + ", ".join(
            f"#{f.slot} pid {f.pid} exit {f.exit_code}" for f in self.failures))


@dataclass
class _Slot:
    index: int
    pid: int | None = None
    signalled_at: float | None = None
    pids: list[int] = field(default_factory=list)  # every pid this slot has had


class Children:
    """Runs `count` copies of `command` with `env` until shutdown, then drains them."""

    name = "processes"

    def __init__(
        self, command: Sequence[str], count: int, *, env: Mapping[str, str],
        on_exit: Callable[[int], None] | None = None, backoff: Backoff | None = None,
    ) -> None:
        self.command = list(command)
        self.count = count
        self.env = {**env, SUPERVISOR_ENV: str(os.getpid())}
        self.on_exit = on_exit or (lambda pid: None)
        self.backoff = backoff or Backoff()
        self.slots = [_Slot(i) for i in range(count)]
        self.restarts = 0
        self.failures: list[ChildFailure] = []

    @property
    def live(self) -> list[int]:
        """Pids of the children running now."""
        return [s.pid for s in self.slots if s.pid is not None]

    def health(self) -> dict[str, object]:
        return {"processes": len(self.live), "wanted": self.count, "restarts": self.restarts}

    async def run(self, shutdown: Shutdown) -> None:
        log.info("processes.started", count=self.count)
        async with asyncio.TaskGroup() as group:
            for slot in self.slots:
                group.create_task(self._keep(slot, shutdown), name=f"process-{slot.index}")
        log.info("processes.stopped", restarts=self.restarts, failed=len(self.failures))
        if self.failures:
            raise ChildrenFailed(self.failures)

    async def _keep(self, slot: _Slot, shutdown: Shutdown) -> None:
        """Keep one child running until shutdown; then drain it."""
        quick_deaths = 0
        while not shutdown.begun:
            began = time.monotonic()
            proc = await asyncio.create_subprocess_exec(*self.command, env=self.env)
            slot.pid, slot.signalled_at = proc.pid, None
            slot.pids.append(proc.pid)
            log.info("process.started", slot=slot.index, pid=proc.pid)
            try:
                exited = asyncio.ensure_future(proc.wait())
                stopping = asyncio.ensure_future(shutdown.wait())
                await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
                stopping.cancel()
                if shutdown.begun:
                    await self._drain(slot, proc, shutdown)
                    return
            except asyncio.CancelledError:  # the stop was forced: do not leave it running
                await self._force(slot, proc)
                raise
            self._exited(slot)
            quick_deaths = 0 if time.monotonic() - began >= self.backoff.stable_s \
                else quick_deaths + 1
            delay = self.backoff.delay(quick_deaths)
            self.restarts += 1
            log.warning("process.died", slot=slot.index, pid=proc.pid,
                        exit_code=proc.returncode, restart_in_s=delay)
            await shutdown.wait(delay)

    def _exited(self, slot: _Slot) -> None:
        if slot.pid is not None:
            self.on_exit(slot.pid)
        slot.pid = None

    def _signal(self, slot: _Slot, proc: asyncio.subprocess.Process, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        slot.signalled_at = slot.signalled_at or time.monotonic()

    async def _drain(self, slot: _Slot, proc: asyncio.subprocess.Process,
                     shutdown: Shutdown) -> None:
        if proc.returncode is None:
            self._signal(slot, proc, signal.SIGTERM)
        exited = asyncio.ensure_future(proc.wait())
        forced = asyncio.ensure_future(shutdown.wait_forced())
        try:
            await asyncio.wait({exited, forced}, timeout=shutdown.drain_remaining()
                               + CHILD_GRACE_S, return_when=asyncio.FIRST_COMPLETED)
        finally:
            forced.cancel()
        forced_here = not exited.done()
        if forced_here:
            await self._force(slot, proc)
        code = proc.returncode if proc.returncode is not None else -signal.SIGKILL
        self._exited(slot)
        # Ended by the drain's SIGTERM itself: it was still starting (a child takes the signal
        # before it takes any work), so it had nothing to drain.
        unstarted = code == -signal.SIGTERM and not forced_here
        if code != 0 and not unstarted and not (shutdown.forced and code == EXIT_FORCED):
            self.failures.append(ChildFailure(slot.index, proc.pid, code))
            log.error("process.drain.failed", slot=slot.index, pid=proc.pid, exit_code=code)
        else:
            log.info("process.drained", slot=slot.index, pid=proc.pid, exit_code=code)

    async def _force(self, slot: _Slot, proc: asyncio.subprocess.Process) -> None:
        """A second SIGTERM (forcing the child's own stop), then SIGKILL if it lingers."""
        if proc.returncode is None:
            if slot.signalled_at is None:
                self._signal(slot, proc, signal.SIGTERM)  # its drain begins
            assert slot.signalled_at is not None
            # A child takes two signals closer than DEBOUNCE_S for one.
            await asyncio.sleep(max(0.0, slot.signalled_at + DEBOUNCE_S + 0.05
                                    - time.monotonic()))
            self._signal(slot, proc, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), FORCE_WAIT_S)
            except TimeoutError:
                log.error("process.killed", slot=slot.index, pid=proc.pid)
                self._signal(slot, proc, signal.SIGKILL)
                await proc.wait()
        self._exited(slot)


def follow_supervisor() -> None:
    """In a child started by `Children`: SIGTERM (a drain) when the supervisor dies, on Linux;
    at once if it already has."""
    expected = os.environ.get(SUPERVISOR_ENV)
    if not expected or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != int(expected):
        os.kill(os.getpid(), signal.SIGTERM)
