"""Server-Sent Events: one task's transitions, and every transition (with `Last-Event-ID`
resumption within the events stream's window). Both are fed by the process's event hub.

Each frame is `id:` (the event's stream id), `event:` (its kind) and one `data:` line of JSON.
A task's stream begins with a `state` event holding the task as Postgres has it, and ends after
its final event. A comment line every `KEEPALIVE_S` keeps proxies from closing an idle stream;
then the task is read once more, so a stream whose final event was never published (a
transition made by the cron service, an event lost with Redis) still ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Collection
from typing import Any, get_args

import orjson
from starlette.responses import StreamingResponse

from conveyor.api.responses import OrjsonResponse
from conveyor.client import Client, apply_event
from conveyor.errors import Unavailable
from conveyor.queue.events import (
    CLOSING,
    FINAL_STATUSES,
    RESYNC,
    Event,
    EventKind,
    Follower,
    Hub,
    entry_of,
    stream_order,
)
from conveyor.store.tasks import TaskRecord

KEEPALIVE_S = 15.0
# Longest wait for the process's events reader to take its position (its first read of Redis)
# before a stream opens; then Unavailable (503 with Retry-After): Redis is away.
READY_S = 5.0
MEDIA_TYPE = "text/event-stream"
_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
KINDS = tuple(k for k in get_args(EventKind) if k != "resync")  # resync never leaves the hub


def response_doc(description: str, kinds: Collection[str]) -> dict[str, Any]:
    """The OpenAPI description of a 200 event stream whose events are of `kinds`: before
    OpenAPI 3.2 (`itemSchema`), a `text/event-stream` media type's `schema` describes one
    event, as the `EventSource` API reads it (`event`, `id`, `data`)."""
    event = {
        "type": "object",
        "required": ["event", "data"],
        "properties": {
            "event": {"type": "string", "enum": sorted(kinds)},
            "id": {"type": "string", "description": "the event's stream id (none on `state`)"},
            "data": {"type": "string", "contentMediaType": "application/json",
                     "contentSchema": {"type": "object"},
                     "description": "one JSON object: the task (`state`) or the event"},
        },
    }
    return {"description": description, "content": {MEDIA_TYPE: {"schema": event}}}


def frame(kind: str, data: bytes, event_id: str | None = None) -> bytes:
    head = f"id: {event_id}\n" if event_id else ""
    return f"{head}event: {kind}\n".encode() + b"data: " + data + b"\n\n"


def _state(record: TaskRecord) -> bytes:
    return frame("state", OrjsonResponse(None).render(record))


async def _enter(stack: contextlib.AsyncExitStack, watching: Any) -> Any:
    """Enter the hub's `watching` context within READY_S; Unavailable if its reader cannot
    start (Redis away): the request fails now rather than waits with no answer."""
    try:
        async with asyncio.timeout(READY_S):
            return await stack.enter_async_context(watching)
    except TimeoutError:
        raise Unavailable("events.hub", "Redis did not answer") from None


def stream(body: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(body, media_type=MEDIA_TYPE, headers=_HEADERS)


async def task_stream(client: Client, hub: Hub, task_id: uuid.UUID) -> StreamingResponse:
    """The stream of one task; TaskNotFound (before any byte is sent) if there is none."""
    stack = contextlib.AsyncExitStack()
    queue: asyncio.Queue[Event] = await _enter(stack, hub.watch(str(task_id)))
    try:
        record = await client.get(task_id)
    except BaseException:
        await stack.aclose()
        raise

    async def body() -> AsyncIterator[bytes]:
        nonlocal record
        async with stack:
            yield _state(record)
            while record.status not in FINAL_STATUSES:
                try:
                    e = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
                except TimeoutError:
                    # A quiet while: the truth, once more. A transition no event announces
                    # (rebalance's dead-lettering, a requeue that ends a cancelled task, an
                    # event a worker dropped while Redis was away) ends the stream here; a
                    # task pruned meanwhile ends it too.
                    try:
                        current = await client.store.get(task_id)
                    except Unavailable:  # Postgres away: ask again after the next quiet while
                        yield b": keepalive\n\n"
                        continue
                    if current is None:
                        return
                    if current.status in FINAL_STATUSES:
                        yield _state(current)
                        return
                    yield b": keepalive\n\n"
                    continue
                if e is CLOSING:
                    return
                if e is RESYNC:  # events may have been missed: the truth, once more
                    record = await client.get(task_id)
                    yield _state(record)
                    continue
                record = apply_event(record, e) or await client.get(task_id)
                yield frame(e.kind, e.as_json(), e.id)

    return stream(body())


async def all_events(
    client: Client, hub: Hub, types: Collection[str], statuses: Collection[str],
    last_event_id: str | None,
) -> StreamingResponse:
    """Every transition (of `types`, reaching `statuses`, when given); after `last_event_id`
    the kept events since are replayed first. A `gap` event says the window no longer holds
    all of them; the stream ends when this follower falls too far behind (resume by id)."""
    assert client.events is not None
    log = client.events
    stack = contextlib.AsyncExitStack()
    follower: Follower = await _enter(stack, hub.follow(types, statuses))

    def wanted(e: Event) -> bool:
        return (not types or e.task_type in types) and (not statuses or e.status in statuses)

    async def body() -> AsyncIterator[bytes]:
        last = last_event_id
        async with stack:
            if last is not None:
                oldest, _ = await log.bounds()
                if oldest is not None and stream_order(oldest) > stream_order(entry_of(last)):
                    yield frame("gap", orjson.dumps({"oldest": oldest, "after": last}))
                cursor: str | None = last
                while cursor is not None:
                    batch, cursor = await log.since(cursor)
                    for e in batch:
                        if wanted(e):
                            yield frame(e.kind, e.as_json(), e.id)
                    if batch:
                        last = batch[-1].id
            while not follower.lagged:
                try:
                    e = await asyncio.wait_for(follower.queue.get(), KEEPALIVE_S)
                except TimeoutError:
                    yield b": keepalive\n\n"
                    continue
                if last is not None and stream_order(e.id) <= stream_order(last):
                    continue
                last = e.id
                yield frame(e.kind, e.as_json(), e.id)

    return stream(body())
