"""The overview's per-minute figures (succeeded and dead per task type over the last hour),
kept in memory so that a page costs nothing however many tasks an hour finishes.

Two sources, split at the moment `since` this process began following the event stream: the
minutes before it are read once from Postgres (the record; `Dashboard.minutes`, in the
background), the minutes after it are counted from the `succeeded` and `dead` events as the
process's hub delivers them (an event's time is its stream id's). When the hub may have missed
events (Redis was away, or this follower fell behind), the split moves to now and the record
is read again. Every process keeps its own copy; each sees every event.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

import structlog

from conveyor.errors import Unavailable
from conveyor.queue.events import Hub
from conveyor.store.dashboard import Dashboard, Minute

log = structlog.get_logger("conveyor.ui")
SPAN_MIN = 60
IDLE_S = 300.0  # no overview asked for this long: stop following (the next one starts again)
_KINDS = {"succeeded": 0, "dead": 1}


def _minute(epoch_s: float) -> int:
    return int(epoch_s // 60)


class Throughput:
    """Succeeded and dead per type and minute; `rows(type)` is what the overview draws."""

    def __init__(self, hub: Hub, dashboard: Dashboard, types: Iterable[str]) -> None:
        self.hub = hub
        self.dashboard = dashboard
        self.types = list(types)
        self.since = time.time()  # the split: the record before it, events after it
        self._events: dict[str, dict[int, list[int]]] = defaultdict(dict)
        self._record: dict[str, dict[int, list[int]]] = {}
        self._task: asyncio.Task[None] | None = None
        self._filled = asyncio.Event()
        self._asked = time.monotonic()

    async def ensure(self, wait_s: float = 0.2) -> None:
        """Start following (once), and give the first read of the record up to `wait_s`."""
        self._asked = time.monotonic()
        if self._task is None or self._task.done():
            self._filled.clear()
            self._task = asyncio.create_task(self._follow(), name="ui-throughput")
        if not self._filled.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._filled.wait(), wait_s)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    @property
    def filled(self) -> bool:
        return self._filled.is_set()

    def _idle(self) -> bool:
        return time.monotonic() - self._asked > IDLE_S

    async def _follow(self) -> None:
        while not self._idle():
            if self.hub.closing:  # the process stops
                await asyncio.sleep(1.0)
                continue
            try:
                async with self.hub.follow(statuses=tuple(_KINDS)) as follower:
                    self._restart()
                    fill = asyncio.create_task(self._fill(self.since))
                    try:
                        while not follower.lagged:
                            try:
                                e = await asyncio.wait_for(follower.queue.get(), 1.0)
                            except TimeoutError:
                                if self._idle():
                                    return
                                continue
                            place = _KINDS.get(e.kind)
                            if place is None:
                                continue
                            at = int(e.id.partition("-")[0]) / 1000 if e.id else time.time()
                            if at < self.since:  # before the split: the record has it
                                continue
                            counts = self._events[e.task_type].setdefault(_minute(at), [0, 0])
                            counts[place] += 1
                    finally:
                        fill.cancel()
            except Unavailable as exc:
                log.warning("ui.throughput.unavailable", error=str(exc))
                await asyncio.sleep(1.0)

    def _restart(self) -> None:
        self.since = time.time()
        self._events.clear()

    async def _fill(self, until: float) -> None:
        """The record's minutes before `until`, for every type (retried while Postgres is
        away)."""
        cutoff = datetime.fromtimestamp(until, UTC)
        while True:
            try:
                record: dict[str, dict[int, list[int]]] = {}
                for name in self.types:
                    rows = await self.dashboard.minutes(name, SPAN_MIN, until=cutoff)
                    record[name] = {_minute(r.at.timestamp()): [r.succeeded, r.dead]
                                    for r in rows}
                self._record = record
                self._filled.set()
                return
            except Unavailable as exc:
                log.warning("ui.throughput.fill_failed", error=str(exc))
                await asyncio.sleep(2.0)

    def rows(self, type_: str, now: datetime | None = None) -> list[Minute]:
        """The last SPAN_MIN minutes of `type_` that have any, oldest first."""
        now = now or datetime.now(UTC)
        first = _minute((now - timedelta(minutes=SPAN_MIN - 1)).timestamp())
        merged: dict[int, list[int]] = {}
        for source in (self._record.get(type_, {}), self._events.get(type_, {})):
            for minute, (s, d) in source.items():
                if minute >= first:
                    total = merged.setdefault(minute, [0, 0])
                    total[0] += s
                    total[1] += d
        for name in list(self._events):  # forget minutes past the span
            self._events[name] = {m: c for m, c in self._events[name].items() if m >= first}
        return [Minute(datetime.fromtimestamp(m * 60, UTC), s, d)
                for m, (s, d) in sorted(merged.items())]
