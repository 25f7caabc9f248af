"""TaskStreams.read_marked and wait_new on a real Redis: a consumer that waits for new entries
without holding a slot sees every entry its last read did not deliver, and the wait delivers
nothing to the group."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from conveyor.queue.keys import GROUP
from conveyor.state import AppState

TYPE = "echo"


async def _add(state: AppState, n: int = 1) -> list[bytes]:
    ids: list[Any] = [await state.redis.xadd(state.keys.stream(TYPE), {"id": "x", "r": "0"})
                      for _ in range(n)]
    return ids


async def _pending(state: AppState) -> int:
    summary: Any = await state.redis.xpending(state.keys.stream(TYPE), GROUP)
    return int(summary["pending"])


async def test_a_short_read_marks_the_last_entry(state: AppState) -> None:
    await state.streams.ensure_group(TYPE)
    ids = await _add(state, 3)
    messages, mark = await state.streams.read_marked(TYPE, "c1", 5)
    assert [m.stream_id for m in messages] == ids
    assert mark == ids[-1]
    assert await _pending(state) == 3


async def test_a_full_read_leaves_the_rest_for_the_next(state: AppState) -> None:
    await state.streams.ensure_group(TYPE)
    ids = await _add(state, 3)
    messages, _ = await state.streams.read_marked(TYPE, "c1", 2)
    assert [m.stream_id for m in messages] == ids[:2]
    messages, mark = await state.streams.read_marked(TYPE, "c1", 2)
    assert [m.stream_id for m in messages] == ids[2:]
    assert mark == ids[-1]


async def test_an_empty_stream_marks_zero(state: AppState) -> None:
    await state.streams.ensure_group(TYPE)
    assert await state.streams.read_marked(TYPE, "c1", 5) == ([], b"0-0")


async def test_wait_new_times_out_when_nothing_arrives(state: AppState) -> None:
    await state.streams.ensure_group(TYPE)
    await _add(state, 2)
    _, mark = await state.streams.read_marked(TYPE, "c1", 5)
    began = time.monotonic()
    assert await state.streams.wait_new(TYPE, mark, 100) is False
    assert time.monotonic() - began >= 0.09


async def test_wait_new_wakes_for_an_entry_past_the_mark_and_delivers_nothing(
    state: AppState
) -> None:
    await state.streams.ensure_group(TYPE)
    _, mark = await state.streams.read_marked(TYPE, "c1", 5)
    waiting = asyncio.create_task(state.streams.wait_new(TYPE, mark, 5000))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    [added] = await _add(state)
    assert await asyncio.wait_for(waiting, 2) is True
    assert await _pending(state) == 0  # the wait claimed nothing
    messages, _ = await state.streams.read_marked(TYPE, "c1", 5)
    assert [m.stream_id for m in messages] == [added]


async def test_an_entry_added_before_the_wait_begins_wakes_it_at_once(state: AppState) -> None:
    await state.streams.ensure_group(TYPE)
    _, mark = await state.streams.read_marked(TYPE, "c1", 5)
    await _add(state)  # between the read and the wait
    began = time.monotonic()
    assert await state.streams.wait_new(TYPE, mark, 5000) is True
    assert time.monotonic() - began < 2


async def test_a_lost_group_is_recreated_and_its_entries_are_new(state: AppState) -> None:
    ids = await _add(state, 2)  # creates the stream, with no group
    assert await state.streams.read_marked(TYPE, "c1", 5) == ([], b"0-0")
    assert await state.streams.wait_new(TYPE, b"0-0", 5000) is True
    messages, _ = await state.streams.read_marked(TYPE, "c1", 5)
    assert [m.stream_id for m in messages] == ids
