"""The lock's scripts against a real Redis: only the token's owner releases or extends it; and
`held()`, by the local clock, never outlives the TTL Redis counts."""

from __future__ import annotations

from conveyor.queue.lock import Lock
from conveyor.state import AppState


def pair(state: AppState, ttl_ms: int = 10_000) -> tuple[Lock, Lock, str]:
    key = state.keys.lock("test")
    return Lock(state.redis, key, ttl_ms), Lock(state.redis, key, ttl_ms), key


async def test_one_holder_at_a_time(state: AppState) -> None:
    a, b, key = pair(state)
    assert await a.acquire()
    assert not await b.acquire()
    assert await state.redis.get(key) == a.token.encode()
    assert a.held()
    assert not b.held()


async def test_a_non_holder_neither_releases_nor_extends(state: AppState) -> None:
    a, b, key = pair(state)
    assert await a.acquire()
    await state.redis.pexpire(key, 2_000)  # as if most of the TTL had passed
    assert not await b.release()
    assert not await b.extend()
    assert await state.redis.get(key) == a.token.encode()
    assert 0 < await state.redis.pttl(key) <= 2_000  # not reset by the stranger
    assert not b.held()


async def test_the_holder_extends_and_releases(state: AppState) -> None:
    a, b, key = pair(state)
    assert await a.acquire()
    await state.redis.pexpire(key, 2_000)
    assert await a.extend()
    assert await state.redis.pttl(key) > 5_000
    assert await a.release()
    assert not a.held()
    assert await state.redis.exists(key) == 0
    assert await b.acquire()


async def test_an_expired_holder_can_neither_revive_nor_free_its_successors_lock(
    state: AppState,
) -> None:
    a, b, key = pair(state)
    assert await a.acquire()
    await state.redis.delete(key)  # its TTL ran out
    assert not await a.extend()
    assert not a.held()
    assert await state.redis.exists(key) == 0  # extend did not recreate it
    assert await b.acquire()
    assert not await a.extend()
    assert not await a.release()
    assert await state.redis.get(key) == b.token.encode()


async def test_held_counts_the_ttl_from_before_the_request(state: AppState) -> None:
    now = [100.0]
    lock = Lock(state.redis, state.keys.lock("test"), ttl_ms=1_000, clock=lambda: now[0])
    assert not lock.held()
    assert await lock.acquire()
    now[0] = 100.5
    assert lock.held()
    assert lock.held(margin_s=0.4)
    assert not lock.held(margin_s=0.5)
    now[0] = 101.0
    assert not lock.held()
    now[0] = 101.2
    assert await lock.extend()  # Redis's copy still lives: its TTL is 1 s of real time
    assert lock.held(margin_s=0.9)
    assert not lock.held(margin_s=1.0)
    await lock.release()
    assert not lock.held()


async def test_a_slow_reply_shortens_what_held_promises(state: AppState) -> None:
    lock = Lock(state.redis, state.keys.lock("test"), ttl_ms=2_000)
    await state.redis.client_pause(400, all=False)  # writes (the SET) wait 0.4 s
    assert await lock.acquire()
    assert lock.held(margin_s=1.0)
    assert not lock.held(margin_s=1.7)  # Redis may have set the key 0.4 s after it was sent
