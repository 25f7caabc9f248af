"""Task events in Redis: the one owner of their wire format, the stream that keeps them, the
process's single reader that fans them out to waiters, and the channel of cancel requests.

Every transition is written to Postgres first and then published here (`queued` by the API
after its commit, the rest by the worker after its durable write), to one stream capped at
`maxlen` entries (`XADD MAXLEN ~`): its entry ids are the events' ids, so a follower that lost
its connection resumes after the last id it saw, within that window.

A process reads the stream once (`Hub`: one blocking `XREAD`) and hands each event to the
waiters of its task and to the followers of every event; no waiter ever asks Postgres while it
waits. Postgres stays the truth: a waiter reads the task once when it starts, and again only
when the hub could not read for a while (`RESYNC`: events may have been missed) or when an
event does not carry the whole result.

Events published together (a worker's batch, an enqueue's tasks) share one stream entry, so a
completion costs a share of one `XADD`, not one of its own. The entry's one field `b` is a JSON
list of `[kind, task id, type, status after the event, details]`, details a JSON object
(attempt, worker, error, run_at, result, progress, ...). An event's id is its entry's id and
its place in it: `1733090000000-0.3`; ids sort as (ms, seq, place).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import orjson
import structlog

from conveyor.errors import Unavailable
from conveyor.queue import pubsub
from conveyor.queue.connection import Redis, translate
from conveyor.queue.keys import Keys
from conveyor.runtime.outage import Outage
from conveyor.runtime.shutdown import Shutdown

log = structlog.get_logger("conveyor.events")

EventKind = Literal["queued", "started", "progress", "retrying", "succeeded", "dead",
                    "cancelled", "cancel_requested", "resync"]
FINAL_KINDS = frozenset({"succeeded", "dead", "cancelled"})
FINAL_STATUSES = frozenset({"succeeded", "dead", "cancelled"})
MAX_RESULT_BYTES = 16 * 1024  # a larger result is left out of its event (read the task)
_PAST_LAST = 2**31  # a place after every event of an entry


# `ms-seq` (or `ms`), each a 64-bit unsigned integer in ASCII digits as Redis takes them, then
# an event's place in its entry: what int() alone accepts (`1_0`, `+1`, ` 1`, other scripts'
# digits) Redis refuses, and the refusal would come in the middle of a stream.
_EVENT_ID = re.compile(r"([0-9]{1,20})(?:-([0-9]{1,20}))?(?:\.([0-9]{1,10}))?")
_U64 = 2**64


def stream_order(event_id: str) -> tuple[int, int, int]:
    """An event id (or a stream entry id) as a sortable triple; ValueError if it is neither.
    An entry id sorts before its events."""
    match = _EVENT_ID.fullmatch(event_id)
    if match is None:
        raise ValueError(f"not an event id: {event_id!r}")
    ms, seq = int(match[1]), int(match[2] or 0)
    if ms >= _U64 or seq >= _U64:
        raise ValueError(f"not an event id (past 64 bits): {event_id!r}")
    return ms, seq, int(match[3]) if match[3] is not None else -1


def entry_of(event_id: str) -> str:
    """The stream entry id of an event id."""
    return event_id.partition(".")[0]


@dataclass(frozen=True, slots=True)
class Event:
    """One transition of one task. `data` is a JSON object (bytes); `id` is its stream id
    once published (empty before)."""

    kind: EventKind
    task_id: str
    task_type: str
    status: str
    data: bytes = b"{}"
    id: str = ""

    @property
    def final(self) -> bool:
        return self.kind in FINAL_KINDS

    def details(self) -> dict[str, Any]:
        value: dict[str, Any] = orjson.loads(self.data)
        return value

    def as_json(self) -> bytes:
        """The event as SSE `data` and the Python client show it."""
        head = orjson.dumps({"id": self.id or None, "kind": self.kind, "task_id": self.task_id,
                             "type": self.task_type, "status": self.status})
        if self.data in (b"{}", b""):
            return head
        return head[:-1] + b"," + self.data[1:]


def event(kind: EventKind, task_id: object, task_type: str, status: str,
          **details: Any) -> Event:
    """An event with `details` as its data; a `result_json` detail (already JSON) is embedded
    as `result` if small enough, else `result_omitted` says to read the task."""
    result_json = details.pop("result_json", None)
    if result_json is not None:
        if len(result_json) <= MAX_RESULT_BYTES:
            details["result"] = orjson.Fragment(result_json)
        else:
            details["result_omitted"] = True
    return Event(kind, str(task_id), task_type, status, orjson.dumps(details))


def cancelled(task_id: object, task_type: str, finished_at: datetime | None) -> Event:
    """A task that ended cancelled outside a handler's outcome (the API's cancel of a queued
    task, or a cancel asked of a task whose worker was lost or stopped meanwhile)."""
    return event("cancelled", task_id, task_type, "cancelled", finished_at=finished_at,
                 outcome="cancelled")


RESYNC = Event("resync", "", "", "")  # the hub may have missed events: read Postgres again
CLOSING = Event("resync", "", "", "closing")  # the process stops: answer with what is known


def _encode(events: Sequence[Event]) -> dict[str, bytes]:
    return {"b": orjson.dumps([[e.kind, e.task_id, e.task_type, e.status,
                                orjson.Fragment(e.data)] for e in events])}


def _decode(entry_id: bytes, fields: dict[bytes, bytes]) -> list[Event]:
    entry = entry_id.decode()
    try:
        rows = orjson.loads(fields[b"b"])
        return [Event(kind, task_id, task_type, status, orjson.dumps(details), f"{entry}.{i}")
                for i, (kind, task_id, task_type, status, details) in enumerate(rows)]
    except (KeyError, ValueError, TypeError):
        log.warning("events.malformed", id=entry)
        return []


class EventLog:
    """The events stream and the cancel channel of one key prefix."""

    def __init__(self, redis: Redis, keys: Keys, *, maxlen: int = 100_000) -> None:
        self.redis = redis
        self.key = keys.events()
        self.cancel_channel = keys.cancels()
        self.maxlen = maxlen

    def add(self, pipe: Any, events: Sequence[Event]) -> None:
        """Queue the XADD of `events` (one entry) on a caller's pipeline."""
        if events:
            pipe.xadd(self.key, _encode(events), maxlen=self.maxlen, approximate=True)

    async def publish(self, events: Sequence[Event]) -> None:
        if not events:
            return
        with translate("events.publish"):
            async with self.redis.pipeline(transaction=False) as pipe:
                self.add(pipe, events)
                await pipe.execute()

    async def read(self, after: str, block_ms: int, count: int = 1000) -> list[Event]:
        """Events after `after`, waiting up to `block_ms` for one."""
        with translate("events.read"):
            reply: Any = await self.redis.xread({self.key: after}, count=count, block=block_ms)
        if not reply:
            return []
        return [e for entry_id, fields in reply[0][1] for e in _decode(entry_id, fields)]

    async def since(self, after: str, count: int = 100) -> tuple[list[Event], str | None]:
        """Stored events after the event (or entry) id `after`, oldest first, from up to
        `count` entries (no wait); and where to go on from (None: nothing more yet)."""
        with translate("events.range"):
            rows: Any = await self.redis.xrange(self.key, min=entry_of(after), max="+",
                                                count=count)
        floor = stream_order(after)
        events = [e for entry_id, fields in rows for e in _decode(entry_id, fields)
                  if stream_order(e.id) > floor]
        if len(rows) < count:
            return events, None
        return events, f"{rows[-1][0].decode()}.{_PAST_LAST}"

    async def bounds(self) -> tuple[str | None, str]:
        """(id of the oldest event kept or None, id of the newest or `0-0`)."""
        with translate("events.bounds"):
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.xrange(self.key, count=1)
                pipe.xrevrange(self.key, count=1)
                first, last = await pipe.execute()
        return (first[0][0].decode() if first else None,
                last[0][0].decode() if last else "0-0")

    async def request_cancel(self, task_id: object) -> None:
        """Tell every worker that the task should stop (each checks whether it runs it)."""
        with translate("events.cancel"):
            await self.redis.publish(self.cancel_channel, str(task_id))

    async def cancel_requests(self, stop: Shutdown) -> AsyncIterator[str]:
        """Task ids whose cancel is requested, as published, until `stop` begins; reconnects
        by itself (a message sent meanwhile is missed: the worker's beat is the backstop)."""
        async for message in pubsub.messages(self.redis, self.cancel_channel, stop,
                                             op="events.cancels", outage="worker.cancels"):
            yield message


class Publisher:
    """A worker's events, published in the order they happened, in batches, off the hot path:
    `emit` never waits. While Redis is away, up to `capacity` events wait; older ones are
    dropped (a waiter then learns the outcome from Postgres when its wait ends)."""

    def __init__(self, events: EventLog, *, capacity: int = 10_000, linger_s: float = 0.0,
                 busy: Callable[[], bool] | None = None) -> None:
        self.events = events
        self.capacity = capacity
        # While `busy()` (handlers running: more events are coming), wait `linger_s` before
        # a publish so that one XADD carries the events of several batches; not once a final
        # event is waiting: waiters end on those, and the recorder that emits them has
        # already gathered its batch (its own linger), so they go out at once, with whatever
        # was emitted before them.
        self.linger_s = linger_s
        self.busy = busy
        self._buffer: list[Event] = []
        self._wake = asyncio.Event()
        self._final = asyncio.Event()
        self._outage = Outage("worker.events")
        self.dropped = 0

    def emit(self, *events: Event) -> None:
        self._buffer.extend(events)
        overflow = len(self._buffer) - self.capacity
        if overflow > 0:
            del self._buffer[:overflow]
            self.dropped += overflow
        if any(e.final for e in events):
            self._final.set()
        self._wake.set()

    async def run(self, stop: Shutdown) -> None:
        """Publish until `stop` begins and the buffer is empty (or Redis is away then)."""
        stop.when_begun(self._wake.set)
        while True:
            if not self._buffer:
                if stop.begun:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            if (self.linger_s > 0 and not stop.begun and len(self._buffer) < 1000
                    and not self._final.is_set() and self.busy is not None and self.busy()):
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.linger_s):
                        await self._final.wait()
            batch, self._buffer = self._buffer[:1000], self._buffer[1000:]
            if not any(e.final for e in self._buffer):  # a rest past 1,000 keeps the flag
                self._final.clear()
            try:
                await self.events.publish(batch)
                self._outage.recovered()
            except Unavailable as exc:
                self._buffer[:0] = batch
                if any(e.final for e in batch):
                    self._final.set()
                if stop.begun:
                    return
                await self._outage.failed(exc, stop)


@dataclass(eq=False)
class Follower:
    """A follower of every event (the filters applied here); `queue` is bounded: one that
    falls behind by more is cut off (`lagged`) and should resume by its last id."""

    types: Collection[str]
    statuses: Collection[str]
    queue: asyncio.Queue[Event] = field(default_factory=lambda: asyncio.Queue(10_000))
    lagged: bool = False

    def offer(self, e: Event) -> None:
        if self.lagged or (self.types and e.task_type not in self.types) or (
                self.statuses and e.status not in self.statuses):
            return
        try:
            self.queue.put_nowait(e)
        except asyncio.QueueFull:
            self.lagged = True


class Hub:
    """The one reader of the events stream in a process; started by the first watcher."""

    def __init__(self, events: EventLog, *, block_ms: int = 2000, recent: int = 2000) -> None:
        self.events = events
        self.block_ms = block_ms
        self._recent_max = recent
        self._watchers: dict[str, set[asyncio.Queue[Event]]] = {}
        self._followers: set[Follower] = set()
        self._recent: OrderedDict[str, Event] = OrderedDict()  # final events, newest last
        self._task: asyncio.Task[None] | None = None
        self._ready: asyncio.Future[None] | None = None
        self.started_at = 0.0  # time.time() the reader took its position
        self.position = "0-0"
        self.closing = False  # released: new watchers get CLOSING at once

    async def _ensure(self) -> None:
        if self._task is None or self._task.done():
            self._ready = asyncio.get_running_loop().create_future()
            self._task = asyncio.create_task(self._run(self._ready), name="events-hub")
        assert self._ready is not None
        await asyncio.shield(self._ready)

    async def close(self) -> None:
        """Stop the reader (bounded: a blocked read may take its time to let go)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task}, timeout=1.0)

    @contextlib.asynccontextmanager
    async def watch(self, task_id: str) -> AsyncIterator[asyncio.Queue[Event]]:
        """The events of one task from now on (and RESYNC when some may have been missed).
        Entered once the reader has its position: whatever is published later arrives."""
        queue: asyncio.Queue[Event] = asyncio.Queue()
        if self.closing:
            queue.put_nowait(CLOSING)
        self._watchers.setdefault(task_id, set()).add(queue)
        try:
            await self._ensure()
            yield queue
        finally:
            queues = self._watchers.get(task_id)
            if queues is not None:
                queues.discard(queue)
                if not queues:
                    del self._watchers[task_id]

    @contextlib.asynccontextmanager
    async def follow(self, types: Collection[str] = (), statuses: Collection[str] = ()
                     ) -> AsyncIterator[Follower]:
        follower = Follower(types, statuses, lagged=self.closing)
        self._followers.add(follower)
        try:
            await self._ensure()
            yield follower
        finally:
            self._followers.discard(follower)

    def release(self) -> None:
        """The process is stopping: every watcher gets CLOSING (to answer now, the client
        asks again elsewhere) and every follower is cut off; so are those that come later,
        until `reopen`."""
        self.closing = True
        self._broadcast(CLOSING)

    def reopen(self) -> None:
        """Serving (again): watchers wait."""
        self.closing = False

    def recent_final(self, task_id: str) -> Event | None:
        """The final event of `task_id` if this hub read it lately."""
        return self._recent.get(task_id)

    async def _run(self, ready: asyncio.Future[None]) -> None:
        outage = Outage("events.hub")
        while not ready.done():
            try:
                _, self.position = await self.events.bounds()
                self.started_at = time.time()
                ready.set_result(None)
                outage.recovered()
            except Unavailable as exc:
                await outage.failed(exc)
            except Exception:  # a reply it cannot parse: note it, try again
                log.exception("events.hub.failed")
                await asyncio.sleep(1.0)
        while True:
            try:
                batch = await self.events.read(self.position, self.block_ms)
            except Unavailable as exc:
                if not outage.ongoing:
                    self._broadcast(RESYNC)
                await outage.failed(exc)
                continue
            except asyncio.CancelledError:
                raise
            except Exception:  # a reply it cannot parse: note it, keep reading
                log.exception("events.hub.failed")
                await asyncio.sleep(1.0)
                continue
            if outage.ongoing:
                outage.recovered()
                self._broadcast(RESYNC)  # read again: events may have been lost meanwhile
            for e in batch:
                self.position = entry_of(e.id)
                self._deliver(e)

    def _broadcast(self, e: Event) -> None:
        for queues in self._watchers.values():
            for queue in queues:
                queue.put_nowait(e)
        for follower in self._followers:
            follower.lagged = True  # it resumes from its last id

    def _deliver(self, e: Event) -> None:
        if e.final and len(e.data) <= MAX_RESULT_BYTES:
            self._recent[e.task_id] = e
            self._recent.move_to_end(e.task_id)
            while len(self._recent) > self._recent_max:
                self._recent.popitem(last=False)
        for queue in self._watchers.get(e.task_id, ()):
            queue.put_nowait(e)
        for follower in self._followers:
            follower.offer(e)
