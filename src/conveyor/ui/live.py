"""Live updates: Server-Sent Events that say "something changed" (event `changed`), fed by
the process's event hub, after which htmx reloads the part of the page they concern. They
carry no task data, so a page never shows what its fragment route would not.

The overview's stream follows every event, at most one `changed` a second; a task's stream
follows that task's events."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import TypeVar

from fastapi import APIRouter, Request
from starlette.responses import StreamingResponse

from conveyor.errors import Unavailable
from conveyor.queue.events import CLOSING, Hub
from conveyor.ui.pages import ViewerDep, state_of
from conveyor.ui.render import HEADERS
from conveyor.ui.session import PREFIX

KEEPALIVE_S = 15.0
LOOK_S = 1.0  # how often the overview's stream checks whether it was cut off
COALESCE_S = 1.0  # the overview's shortest gap between two `changed`
READY_S = 5.0
CHANGED = b"event: changed\ndata: {}\n\n"
KEEPALIVE = b": keepalive\n\n"
_HEADERS = {**HEADERS, "X-Accel-Buffering": "no"}
T = TypeVar("T")

router = APIRouter(prefix=PREFIX, include_in_schema=False)


def _hub(request: Request) -> Hub:
    hub = state_of(request).client.hub
    assert hub is not None
    return hub


async def _enter(stack: contextlib.AsyncExitStack,
                 watching: contextlib.AbstractAsyncContextManager[T]) -> T:
    """Enter the hub's context within READY_S; Unavailable (503) while Redis is away."""
    try:
        async with asyncio.timeout(READY_S):
            return await stack.enter_async_context(watching)
    except TimeoutError:
        raise Unavailable("ui.live", "Redis did not answer") from None


def _stream(body: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream", headers=_HEADERS)


@router.get("/live")
async def everything(request: Request, view: ViewerDep) -> StreamingResponse:
    stack = contextlib.AsyncExitStack()
    follower = await _enter(stack, _hub(request).follow())

    async def body() -> AsyncIterator[bytes]:
        async with stack:
            # What changed between the page's rendering and this subscription: read it again.
            yield b"retry: 2000\n\n" + CHANGED
            queue, quiet = follower.queue, 0.0
            # Cut off (the process stops, or it fell behind): the browser reconnects.
            while not follower.lagged:
                try:
                    await asyncio.wait_for(queue.get(), LOOK_S)
                except TimeoutError:
                    quiet += LOOK_S
                    if quiet >= KEEPALIVE_S:
                        quiet = 0.0
                        yield KEEPALIVE
                    continue
                quiet = 0.0
                await asyncio.sleep(COALESCE_S)
                while not queue.empty():
                    queue.get_nowait()
                yield CHANGED

    return _stream(body())


@router.get("/tasks/{task_id}/live")
async def one(request: Request, view: ViewerDep, task_id: uuid.UUID) -> StreamingResponse:
    stack = contextlib.AsyncExitStack()
    queue = await _enter(stack, _hub(request).watch(str(task_id)))

    async def body() -> AsyncIterator[bytes]:
        async with stack:
            # What changed between the page's rendering and this subscription: read it again.
            yield b"retry: 2000\n\n" + CHANGED
            while True:
                try:
                    e = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
                except TimeoutError:
                    yield KEEPALIVE
                    continue
                if e is CLOSING:
                    return
                yield CHANGED

    return _stream(body())
