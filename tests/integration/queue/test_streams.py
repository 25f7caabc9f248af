"""The Lua scripts of `TaskStreams` against a real Redis: `_ADD_READY` (a publish's ready tasks,
one command per stream), `_FORWARD` (delayed set → stream) and `_REQUEUE` (claimed entries →
stream again, or dead-lettered), with what they must leave alone."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from conveyor.queue import streams
from conveyor.queue.keys import GROUP
from conveyor.queue.streams import Message, Publish
from conveyor.state import AppState

T = "echo"


async def redis_ms(state: AppState) -> int:
    seconds, micros = await state.redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def entries(state: AppState, key: str) -> list[tuple[bytes, dict[bytes, bytes]]]:
    reply: Any = await state.redis.xrange(key)
    return [(sid, dict(fields)) for sid, fields in reply]


async def delayed(state: AppState) -> list[tuple[str, float]]:
    reply: Any = await state.redis.zrange(state.keys.delayed(T), 0, -1, withscores=True)
    return [(m.decode(), s) for m, s in reply]


# -- publish -------------------------------------------------------------------------------


async def test_publish_adds_each_streams_ready_tasks_in_order_and_the_rest_where_they_go(
    state: AppState, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Many ready tasks of a type (EVALs of at most ADD_READY_MAX), a lone one of another (one
    XADD) and a delayed one: the same messages, in the order given, as one XADD each makes."""
    monkeypatch.setattr(streams, "ADD_READY_MAX", 100)  # 250 ready tasks: three EVALs
    now = await redis_ms(state)
    many = [uuid.uuid4() for _ in range(250)]
    lone, later = uuid.uuid4(), uuid.uuid4()
    items = [Publish(T, t) for t in many[:100]] + [Publish("other", lone)]
    items += [Publish(T, later, run_at_ms=now + 60_000)] + [Publish(T, t) for t in many[100:]]
    await state.streams.publish(items)
    added = await entries(state, state.keys.stream(T))
    assert [f for _, f in added] == [{b"id": str(t).encode(), b"r": b"0"} for t in many]
    assert [f for _, f in await entries(state, state.keys.stream("other"))] == [
        {b"id": str(lone).encode(), b"r": b"0"}]
    assert await delayed(state) == [(str(later), now + 60_000)]


async def test_published_tasks_are_read_by_the_group(state: AppState) -> None:
    await state.streams.ensure_group(T)
    ids = [uuid.uuid4() for _ in range(5)]
    await state.streams.publish([Publish(T, t) for t in ids])
    read = await state.streams.read(T, "c1", 10, None)
    assert [(m.task_id, m.requeues) for m in read] == [(t, 0) for t in ids]


# -- forward -------------------------------------------------------------------------------


async def test_forward_moves_only_due_members_oldest_first(state: AppState) -> None:
    now = await redis_ms(state)
    late, early, future = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    await state.redis.zadd(state.keys.delayed(T), {
        str(future): now + 60_000, str(late): now - 1_000, str(early): now - 5_000,
    })
    assert await state.streams.forward(T) == 2
    moved = await entries(state, state.keys.stream(T))
    assert [f for _, f in moved] == [
        {b"id": str(early).encode(), b"r": b"0"}, {b"id": str(late).encode(), b"r": b"0"},
    ]
    assert await delayed(state) == [(str(future), now + 60_000)]
    assert await state.streams.forward(T) == 0
    assert len(await entries(state, state.keys.stream(T))) == 2


async def test_forward_moves_at_most_the_limit_and_leaves_the_rest_due(state: AppState) -> None:
    now = await redis_ms(state)
    ids = [uuid.uuid4() for _ in range(5)]
    await state.redis.zadd(state.keys.delayed(T),
                           {str(t): now - 10_000 + i for i, t in enumerate(ids)})
    assert await state.streams.forward(T, limit=3) == 3
    moved = await entries(state, state.keys.stream(T))
    assert [f[b"id"].decode() for _, f in moved] == [str(t) for t in ids[:3]]
    assert [m for m, _ in await delayed(state)] == [str(t) for t in ids[3:]]
    assert await state.streams.forward(T, limit=3) == 2
    assert await delayed(state) == []


async def test_forward_with_nothing_due_writes_nothing(state: AppState) -> None:
    now = await redis_ms(state)
    await state.redis.zadd(state.keys.delayed(T), {str(uuid.uuid4()): now + 60_000})
    assert await state.streams.forward(T) == 0
    assert not await state.redis.exists(state.keys.stream(T))
    assert len(await delayed(state)) == 1


async def test_forward_leaves_other_types_alone(state: AppState) -> None:
    now = await redis_ms(state)
    await state.redis.zadd(state.keys.delayed("flaky"), {str(uuid.uuid4()): now - 1_000})
    assert await state.streams.forward(T) == 0
    assert await state.redis.zcard(state.keys.delayed("flaky")) == 1
    assert not await state.redis.exists(state.keys.stream("flaky"))


# -- requeue -------------------------------------------------------------------------------


async def pending(state: AppState) -> list[bytes]:
    rows: Any = await state.redis.xpending_range(state.keys.stream(T), GROUP, "-", "+", 100)
    return [row["message_id"] for row in rows]


async def delivered(state: AppState, n: int) -> list[Message]:
    """Publish `n` tasks and deliver them to consumer c1: they are pending there."""
    await state.streams.ensure_group(T)
    await state.streams.publish([Publish(T, uuid.uuid4()) for _ in range(n)])
    return await state.streams.read(T, "c1", n, None)


async def test_requeue_readds_with_one_more_requeue_and_acks_and_deletes_the_originals(
    state: AppState,
) -> None:
    first, second, untouched = await delivered(state, 3)
    back, dead = await state.streams.requeue(
        T, [first, Message(second.stream_id, second.task_id, 4)], max_requeues=5
    )
    assert (back, dead) == ([first.task_id, second.task_id], [])
    stream = await entries(state, state.keys.stream(T))
    ids = [sid for sid, _ in stream]
    assert first.stream_id not in ids
    assert second.stream_id not in ids
    assert stream[0][0] == untouched.stream_id  # left alone: still there, still pending
    assert [f for _, f in stream[1:]] == [
        {b"id": str(first.task_id).encode(), b"r": b"1"},
        {b"id": str(second.task_id).encode(), b"r": b"5"},
    ]
    assert await pending(state) == [untouched.stream_id]
    assert await entries(state, state.keys.dead(T)) == []
    again = await state.streams.read(T, "c2", 10, None)  # anyone may read them next
    assert [(m.task_id, m.requeues) for m in again] == [
        (first.task_id, 1), (second.task_id, 5)
    ]


async def test_requeue_dead_letters_past_the_limit(state: AppState) -> None:
    at_limit, past = await delivered(state, 2)
    back, dead = await state.streams.requeue(
        T, [Message(at_limit.stream_id, at_limit.task_id, 1),
            Message(past.stream_id, past.task_id, 2)], max_requeues=2,
    )
    assert back == [at_limit.task_id]  # r + 1 == limit: one more try
    assert dead == [past.task_id]
    dead_entries = await entries(state, state.keys.dead(T))
    assert [f for _, f in dead_entries] == [
        {b"id": str(past.task_id).encode(), b"reason": b"delivery limit reached"}
    ]
    stream = await entries(state, state.keys.stream(T))
    assert [f for _, f in stream] == [{b"id": str(at_limit.task_id).encode(), b"r": b"2"}]
    assert await pending(state) == []


async def test_requeue_dead_letters_an_undecodable_entry_without_an_id(state: AppState) -> None:
    await state.streams.ensure_group(T)
    await state.redis.xadd(state.keys.stream(T), {"id": "not-a-uuid"})
    [bad] = await state.streams.read(T, "c1", 1, None)
    assert bad.task_id is None
    assert await state.streams.requeue(T, [bad], max_requeues=5) == ([], [])
    dead_entries = await entries(state, state.keys.dead(T))
    assert [f for _, f in dead_entries] == [
        {b"id": b"", b"reason": b"undecodable message " + bad.stream_id}
    ]
    assert await entries(state, state.keys.stream(T)) == []
    assert await pending(state) == []


async def test_requeue_of_more_than_one_script_call_handles_every_entry(
    state: AppState,
) -> None:
    messages = await delivered(state, 501)  # past one chunk of 500
    back, dead = await state.streams.requeue(T, messages, max_requeues=5)
    assert back == [m.task_id for m in messages]
    assert dead == []
    assert await pending(state) == []
    stream = await entries(state, state.keys.stream(T))
    assert [f[b"id"].decode() for _, f in stream] == [str(m.task_id) for m in messages]
    assert {f[b"r"] for _, f in stream} == {b"1"}
